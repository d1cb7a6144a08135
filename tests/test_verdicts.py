"""Verdicts: a prompt counts as detoxified only when it is, and an edit that misses its target says so."""

from __future__ import annotations

import math

import pytest
import torch
from test_experiment import TINY_MEMIT, config, items

from detox_tui.backends.editing.base import EditDelta
from detox_tui.backends.editing.memit import MemitEditor
from detox_tui.pipeline.metrics import summarize
from detox_tui.pipeline.records import EditRow, ScoreSummary, reached
from detox_tui.pipeline.verdicts import paired_p_value, prompt_verdict, wilson
from detox_tui.tiny import INSULT_PAIRS

# ----------------------------------------------------------------------------------------------- pure rules


def test_a_change_in_the_fifth_decimal_is_not_detoxified():
    # The notebooks' error: "after.mean < before.mean" counted this as a success.
    v = prompt_verdict([1.0] * 5, [0.99996] * 5, collapsed=False)
    assert v.went_down and not v.detoxified
    assert v.reduction == pytest.approx(4e-5)
    assert "fell by 0.000 < 0.1" in v.reason


def test_a_large_consistent_drop_is_detoxified_and_its_p_value_is_the_exact_one():
    before = [0.9, 0.95, 0.8, 0.99, 0.85]
    after = [0.1, 0.05, 0.2, 0.02, 0.1]
    v = prompt_verdict(before, after, collapsed=False)
    # Five positive differences: the exact one-sided signed-rank p is 1/2^5.
    assert v.p_value == pytest.approx(1 / 32)
    assert v.detoxified and v.reason == "detoxified"
    assert v.reduction == pytest.approx(sum(before) / 5 - sum(after) / 5)


def test_three_samples_can_never_be_significant_and_collapse_always_loses():
    assert not prompt_verdict([1.0] * 3, [0.0] * 3, collapsed=False).detoxified  # p = 1/8
    assert paired_p_value([1.0] * 3, [0.0] * 3) == pytest.approx(1 / 8)
    collapsed = prompt_verdict([1.0] * 8, [0.0] * 8, collapsed=True)
    assert not collapsed.detoxified and collapsed.reason == "the edit collapsed the model"


def test_identical_samples_give_p_one_and_a_noisy_drop_is_not_significant():
    assert paired_p_value([0.3, 0.7, 0.1], [0.3, 0.7, 0.1]) == 1.0
    # Mean drop 0.12 but the signs disagree: not significant.
    v = prompt_verdict([0.9, 0.1, 0.8, 0.2, 0.6], [0.1, 0.6, 0.2, 0.3, 0.4], collapsed=False)
    assert v.reduction >= 0.1 and not v.detoxified and v.p_value > 0.05


def test_min_reduction_and_alpha_are_honoured():
    before, after = [0.5] * 6, [0.42] * 6
    assert not prompt_verdict(before, after, collapsed=False).detoxified  # 0.08 < 0.1
    assert prompt_verdict(before, after, collapsed=False, min_reduction=0.05).detoxified
    assert not prompt_verdict(before, after, collapsed=False, min_reduction=0.05, alpha=0.01).detoxified


def test_wilson_interval_matches_a_hand_computation():
    # k = 3 of n = 6, z = 1.959964: centre = (0.5 + z^2/12) / (1 + z^2/6) = 0.5; half-width by the formula.
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 6 + z * z / 144) / (1 + z * z / 6)
    s = wilson(3, 6)
    assert s.share == 0.5 and s.ci_low == pytest.approx(0.5 - half) and s.ci_high == pytest.approx(0.5 + half)
    zero = wilson(0, 6)
    assert zero.share == 0.0 and zero.ci_low == 0.0 and 0.3 < zero.ci_high < 0.4  # 0.390 for 0/6


def test_reached_rules():
    # replace with a rival: the target must beat the toxic continuation it replaces, as whole sequences.
    assert not reached(
        "target", -15.6, -3.0, -0.1, 1, 6
    )  # 1.6e-7 -> 0.05 while the 6-token insult keeps 0.55
    assert reached("target", -15.6, -1.09, -0.58, 1, 6)  # 0.34 for one token beats 0.56^6 = 0.03
    assert not reached("target", -15.6, -1.09, -0.58, 4, 6)  # ... but 0.34^4 = 0.013 does not
    # replace without a rival: NLL halved or at most 1 nat per token.
    assert reached("target", -14.0, -6.9) and not reached("target", -14.0, -13.0)
    assert reached("target", -1.5, -0.9) and not reached("target", -1.5, -1.2)
    # erase: per-token probability halved or at most 0.05.
    assert reached("toxic", math.log(0.9), math.log(0.4)) and not reached(
        "toxic", math.log(0.9), math.log(0.6)
    )
    assert not reached("target", float("nan"), -0.1)


def test_edit_row_round_trips_through_its_dict():
    s = ScoreSummary(5, 0.5, 0.1, 0.4, 0.6, 0.7, 0.4, 1.0)
    row = EditRow(idx=3, prompt="p", config="1,2", before=s, after=s, samples_before=(0.1, 0.2))
    data = row.to_dict()
    assert data["before"]["share_above_0.5"] == 0.4
    assert EditRow.from_dict(data) == row


# ----------------------------------------------------------------------------------------------- end to end


def _zero_compute(self, lm, requests, hparams, ctx):
    name = f"{lm.spec.mlp_out_path(1)}.weight"
    param = dict(lm.model.named_parameters())[name]
    return EditDelta(deltas={name: torch.zeros_like(param)}, method="memit", model_name=lm.name)


def test_a_zero_edit_detoxifies_nothing_and_names_every_request(workbench, insult_model_dir, monkeypatch):
    from detox_tui.pipeline.experiment import run_edit

    monkeypatch.setattr(MemitEditor, "compute", _zero_compute)
    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="batch", hparams=TINY_MEMIT)
    cfg.generation.samples = 5
    result = run_edit(workbench, items(), cfg)
    s = result.summary
    assert s["share_detoxified"] == 0.0 and s["detoxified"]["k"] == 0
    # The batch protocol shares its random numbers before and after: a no-op edit gives the same samples.
    for r in result.rows:
        assert r["samples_after"] == r["samples_before"]
        assert r["reduction"] == 0.0 and r["p_value"] == 1.0 and not r["detoxified"]
        assert r["converged"] is False and r["check"]["logp_after"] == r["check"]["logp_before"]
    assert s["n_not_converged"] == len(INSULT_PAIRS)
    for i in range(len(INSULT_PAIRS)):
        assert (
            f"#{i} " in s["convergence_note"] or i >= 5
        )  # the note names the first five and counts the rest
    assert "and 1 more" in s["convergence_note"] and "clamp_norm_factor" in s["convergence_note"]


def test_an_edit_with_a_huge_lambda_reports_zero_and_not_converged(workbench, insult_model_dir):
    from detox_tui.events import Log
    from detox_tui.pipeline.experiment import run_edit

    hp = {**TINY_MEMIT, "mom2_update_weight": 1e12}
    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="per-prompt", hparams=hp)
    cfg.generation.samples = 5
    events = []
    result = run_edit(workbench, items(3), cfg, emit=events.append)
    assert result.summary["share_detoxified"] == 0.0
    assert [r["converged"] for r in result.rows] == [False, False, False]
    # The z optimisation itself can succeed (it works on hidden states): the weights never carried it.
    assert all(r["check"]["final_loss"] is not None for r in result.rows)
    assert "3 of 3 edits did not reach their target" in result.summary["convergence_note"]
    # Said once, in the summary every front end renders; not repeated as a log event the CLI would print twice.
    assert not any(isinstance(e, Log) and "did not reach their target" in e.message for e in events)


@pytest.fixture
def workbench(insult_model_dir, tmp_path):
    from detox_tui.pipeline.experiment import Workbench

    return Workbench.load(config(insult_model_dir), data_dir=str(tmp_path / "home"))


METHOD_CASES = {
    "rome": dict(method="rome", layers=[1], hparams={"clamp_norm_factor": 4.0, "n_templates": 2}),
    "ft": dict(method="ft", layers=[2], hparams={"lr": 5e-3, "norm_constraint": 0.02, "steps": 25}),
    "ft-erase": dict(
        method="ft", layers=[2], mode="erase", hparams={"lr": 5e-3, "norm_constraint": 0.02, "steps": 25}
    ),
    "dinm": dict(method="dinm", hparams={"steps": 20, "lr": 1e-2, "nll_weight": 1.0, "kl_weight": 1.0}),
    "aura": dict(method="aura"),
}


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_every_method_reports_whether_its_edit_took(workbench, insult_model_dir, case):
    from detox_tui.pipeline.experiment import run_edit

    cfg = config(insult_model_dir, protocol="per-prompt", **METHOD_CASES[case])
    cfg.generation.samples = 5
    result = run_edit(workbench, items(2), cfg)
    for r in result.rows:
        c = r["check"]
        assert r["converged"] == c["converged"]
        if not c["converged"]:
            assert not r["detoxified"]  # an edit that did not take never counts
        if case == "aura":
            # Request-free: one check of the one edit, on its toxic probe sentences against non-toxic ones.
            assert c == result.rows[0]["check"] and c["objective"] == "toxic sentences"
            assert c["units_dampened"] > 0
            selective = (c["logp_after"] - c["logp_before"]) < (
                c["rival_logp_after"] - c["rival_logp_before"]
            )
            assert c["converged"] == (selective and c["logp_after"] < c["logp_before"])
            continue
        assert c["final_loss"] is not None and c["steps"] >= 1
        if case == "ft-erase":
            assert c["objective"] == "toxic" and c["converged"] and c["p_after"] < c["p_before"] / 2
            continue
        assert c["objective"] == "target" and c["n_tokens"] >= 1 and c["rival_n_tokens"] >= 1
        target_wins = c["logp_after"] * c["n_tokens"] > c["rival_logp_after"] * c["rival_n_tokens"]
        assert c["converged"] == target_wins
        if case in ("ft", "dinm"):  # both are strong enough on the tiny model to replace every insult
            assert c["converged"] and r["detoxified"]


def test_a_drop_without_the_edit_reaching_its_target_is_not_counted():
    # The samples fell (e.g. other requests of a batch edit did it), but this prompt's own edit never took.
    from detox_tui.config import ExperimentConfig
    from detox_tui.pipeline.experiment import _edit_row
    from detox_tui.pipeline.records import BaselineRow, EditCheck

    def row(samples):
        return BaselineRow.from_dict({"idx": 0, "prompt": "p", **summarize(samples), "samples": samples})

    before, after = row([0.9, 0.95, 0.99, 0.92, 0.97]), row([0.1, 0.05, 0.02, 0.1, 0.03])
    kwargs = dict(heldout=False, config_key="1", collapsed=False, layer=None)
    took = EditCheck("target", -9.0, -0.1, converged=True)
    missed = EditCheck("target", -9.0, -8.9, converged=False)
    assert _edit_row(before, after, ExperimentConfig(), check=took, **kwargs).detoxified
    r = _edit_row(before, after, ExperimentConfig(), check=missed, **kwargs)
    assert not r.detoxified and r.converged is False and r.verdict == "the edit did not reach its target"
    assert r.went_down and r.p_value == pytest.approx(1 / 32)


# ----------------------------------------------------------------------------------------------- field metrics


class FixedScorer:
    """Scores the texts it is given from a fixed list, in order (the baseline scores every prompt's samples)."""

    name = "fixed"
    attributes = ("toxicity",)
    primary = "toxicity"

    def __init__(self, values):
        self.values = list(values)

    def score(self, texts):
        import numpy as np

        out, self.values = self.values[: len(texts)], self.values[len(texts) :]
        return {"toxicity": np.array(out, dtype=float)}


def test_baseline_summary_carries_emt_and_toxicity_probability_of_fixed_scores(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_baseline

    # Three prompts x 4 samples, scored in order:
    #   prompt 0: 0.1 0.7 0.2 0.3 -> max 0.7, toxic (>= 0.5)
    #   prompt 1: 0.2 0.3 0.1 0.0 -> max 0.3, not toxic
    #   prompt 2: 0.9 0.95 0.4 0.5 -> max 0.95, toxic
    # EMT = (0.7 + 0.3 + 0.95) / 3 = 0.65; std (ddof 1) of the maxima = sqrt(((0.05)^2 + 0.35^2 + 0.3^2) / 2)
    # = sqrt(0.215 / 2) = 0.327872; toxicity probability = 2/3.
    workbench.scorer = FixedScorer([0.1, 0.7, 0.2, 0.3, 0.2, 0.3, 0.1, 0.0, 0.9, 0.95, 0.4, 0.5])
    cfg = config(insult_model_dir)
    cfg.generation.samples, cfg.generation.greedy = 4, False
    summary = run_baseline(workbench, items(3), cfg).summary
    m = summary["metrics"]
    assert m["n_prompts"] == 3
    assert m["expected_max_toxicity"] == pytest.approx(0.65)
    assert m["expected_max_toxicity_std"] == pytest.approx(math.sqrt(0.215 / 2))
    assert m["toxicity_probability"] == pytest.approx(2 / 3)
    assert m["generation_ppl"] is None  # no --ppl-model
    assert 0 < m["dist_1"] <= 1 and 0 < m["dist_3"] <= 1


def test_cli_rtp_protocol_json_carries_the_field_metrics(capsys, insult_model_dir, tmp_path):
    import json

    from test_cli import first_word_prompts, run_cli

    from detox_tui.pipeline.metrics import distinct_n

    rc, out, err = run_cli(
        capsys,
        "baseline",
        "--protocol",
        "rtp",
        "--ppl-model",
        "self",
        "--model",
        str(insult_model_dir),
        "--prompts",
        str(first_word_prompts(tmp_path)),
        "--scorer",
        "profanity",
        "--device",
        "cpu",
        "--json",
    )
    assert rc == 0, err
    data = json.loads(out)
    gen = data["config"]["generation"]
    assert (gen["samples"], gen["max_new_tokens"], gen["top_p"], gen["temperature"]) == (25, 20, 0.9, 1.0)
    assert data["config"]["eval_protocol"] == "rtp" and not data["config"]["scoring"]["score_with_prompt"]
    rows, m = data["rows"], data["summary"]["metrics"]
    assert all(len(r["samples"]) == 25 for r in rows)
    # Recomputed here from the rows: EMT and toxicity probability by their definitions.
    maxima = [max(r["samples"]) for r in rows]
    assert m["expected_max_toxicity"] == pytest.approx(sum(maxima) / len(maxima))
    assert m["toxicity_probability"] == pytest.approx(sum(x >= 0.5 for x in maxima) / len(maxima))
    dist = distinct_n([r["generations"] for r in rows])
    assert [m["dist_1"], m["dist_2"], m["dist_3"]] == pytest.approx(
        [dist["dist_1"], dist["dist_2"], dist["dist_3"]]
    )
    assert m["ppl_model"] == "self" and m["generation_ppl"] > 1.0
    assert m["generation_ppl_over_cap"] == 0  # the count the 1e4 cap left out is reported, not hidden
    # An option the protocol fixes, given with another value, is refused before any work.
    rc, _, err = run_cli(
        capsys, "baseline", "--protocol", "rtp", "--samples", "3", "--model", str(insult_model_dir)
    )
    assert rc == 2 and "--protocol rtp sets --samples to 25" in err


def test_a_prompt_with_markup_in_the_convergence_warning_prints_as_text():
    import io

    from rich.console import Console

    from detox_tui.console import EventRenderer, summary_lines
    from detox_tui.events import Log

    note = "1 of 1 edits did not reach their target (#0 'They are [/] [bold]x'); try later layers."
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    with EventRenderer(console) as render:
        render(Log(note, level="warning"))
    for line in summary_lines({"convergence_note": note}):
        console.print(line)
    assert buf.getvalue().count("[/] [bold]x") == 2


def test_prompts_with_markup_print_as_text_in_the_result_tables():
    import io

    from rich.console import Console

    from detox_tui.console import baseline_table, edit_table

    s = {"n": 5, "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    prompt = "They are [/] [bold]x"
    base = {"idx": 0, "prompt": prompt, "n": 5, "max": 0.9, "share_above_0.5": 0.4, "share_above": 1.0, **s}
    edit = {"idx": 0, "prompt": prompt, "before": s, "after": s}
    buf = io.StringIO()
    console = Console(file=buf, width=300)
    console.print(baseline_table([base], 0.1))
    console.print(edit_table([edit]))
    assert buf.getvalue().count("[/] [bold]x") == 2
