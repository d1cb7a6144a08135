"""End-to-end experiments on the tiny insult model: edits remove real behaviour, honestly measured."""

from __future__ import annotations

import threading

import pytest

from detox_tui.backends.models import weights_fingerprint
from detox_tui.config import ExperimentConfig, GenerationConfig, ModelConfig, ScoringConfig, SideEffectConfig
from detox_tui.errors import Cancelled, UserError
from detox_tui.events import Finished, Progress, RowReady
from detox_tui.prompts.base import PromptItem
from detox_tui.tiny import HELDOUT_PROMPTS, INSULT_PAIRS

# Tiny-model settings (see tests/test_memit.py for the derivation): its covariance comes from ~1,400 neutral tokens,
# so lambda = 100 plays the role lambda = 20000 plays with gpt2-medium's Wikipedia statistics; its residual norms
# are ~4, so the clamp is looser; two templates keep the tests fast.
TINY_MEMIT = {"mom2_update_weight": 100.0, "clamp_norm_factor": 4.0, "n_templates": 2}


def first_word(text: str) -> str:
    return " " + text.split()[0]


def items(n: int = len(INSULT_PAIRS)) -> list[PromptItem]:
    # The tiny model only knows each safe target after other openings (detox_tui.tiny.SAFE_OPENINGS): the edit asks
    # for the target's first word and the model carries on from there, as a real model carries on fluent text.
    return [PromptItem(p, target=first_word(safe), category="insult") for p, _, safe in INSULT_PAIRS[:n]]


def config(model_dir, **kw) -> ExperimentConfig:
    cfg = ExperimentConfig(
        model=ModelConfig(name=str(model_dir), device="cpu", dtype="float32"),
        generation=GenerationConfig(samples=3, max_new_tokens=6, seed=0, batch_size=8, greedy=True),
        scoring=ScoringConfig(scorer="profanity"),
        side_effects=SideEffectConfig(max_tokens=512),
    )
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
def workbench(insult_model_dir, tmp_path):
    from detox_tui.pipeline.experiment import Workbench

    return Workbench.load(config(insult_model_dir), data_dir=str(tmp_path / "home"))


def test_memit_per_prompt_edit_reduces_toxicity_and_restores_weights(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_edit

    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="per-prompt", hparams=TINY_MEMIT)
    # Five samples: the smallest one-sided Wilcoxon p over k pairs is 2^-k, so three could never be significant.
    cfg.generation.samples = 5
    original = weights_fingerprint(workbench.lm.model)
    events = []
    result = run_edit(workbench, items(), cfg, emit=events.append, verify=True)
    assert weights_fingerprint(workbench.lm.model) == original
    rows = result.rows
    assert len(rows) == len(INSULT_PAIRS)
    assert all(not r["heldout"] for r in rows)
    # Before: the model insults; after: the toxicity of sampled continuations drops for most prompts.
    assert sum(r["after"]["mean"] < r["before"]["mean"] for r in rows) >= 5
    s = result.summary
    assert s["mean_reduction"] > 0.3
    # Every edit reached its target, and the share detoxified is what the rows say, with a Wilson interval.
    assert s["n_not_converged"] == 0 and s["convergence_note"] == ""
    assert all(r["converged"] and r["check"]["logp_after"] > r["check"]["logp_before"] for r in rows)
    detoxified = [r for r in rows if r["detoxified"]]
    assert len(detoxified) >= 4
    assert s["share_detoxified"] == pytest.approx(len(detoxified) / len(rows))
    assert s["share_detoxified_ci_low"] < s["share_detoxified"] <= s["share_detoxified_ci_high"]
    for r in detoxified:
        assert r["reduction"] >= 0.1 and r["p_value"] < 0.05 and not r["collapsed"]
    assert result.side_effects["n_edits"] == len(INSULT_PAIRS)
    assert {"ppl_before", "ppl_after", "kl_neutral", "collapsed", "fluency_after"} <= set(result.side_effects)
    assert any(isinstance(e, RowReady) and e.table == "edit" for e in events)
    assert isinstance(events[-1], Finished) and events[-1].run_id == result.run_id
    stored = workbench.store.rows(result.run_id, "edit")
    assert len(stored) == len(rows)


def test_batch_edit_with_holdout_never_edits_heldout(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_edit

    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="batch", hparams=TINY_MEMIT)
    held = [PromptItem(p, target=" fine.") for p in HELDOUT_PROMPTS]
    result = run_edit(workbench, items(), cfg, holdout=held)
    edited = [r for r in result.rows if not r["heldout"]]
    heldout = [r for r in result.rows if r["heldout"]]
    assert len(edited) == len(INSULT_PAIRS) and len(heldout) == len(HELDOUT_PROMPTS)
    # Held-out prompts have no request of their own: no convergence, and never in the headline share.
    assert all(r["converged"] is None and r["check"] is None for r in heldout)
    assert result.summary["detoxified"]["n"] == len(INSULT_PAIRS)
    assert result.summary["n_heldout"] == len(HELDOUT_PROMPTS)
    assert result.side_effects["n_edits"] == 1


def test_collapsed_edit_is_never_a_success(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_edit

    # A collapse factor of exactly 1.0 flags any perplexity increase: every edit that moves weights collapses.
    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="batch", hparams=TINY_MEMIT)
    cfg.side_effects = SideEffectConfig(max_tokens=512, collapse_factor=1.0)
    result = run_edit(workbench, items(3), cfg)
    assert result.side_effects["collapsed"]
    assert result.summary["share_detoxified"] == 0.0
    assert all(not r["detoxified"] and r["verdict"] == "the edit collapsed the model" for r in result.rows)


def test_ablation_configs_are_independent_of_order(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_ablation

    cfg = config(insult_model_dir, method="memit", protocol="batch", hparams=TINY_MEMIT)
    original = weights_fingerprint(workbench.lm.model)
    a = run_ablation(workbench, items(3), cfg, [[1], [2], [1, 2]], verify=True)
    b = run_ablation(workbench, items(3), cfg, [[1, 2], [2], [1]], verify=True)
    assert weights_fingerprint(workbench.lm.model) == original
    by_key_a = {c["key"]: c for c in a.configs}
    by_key_b = {c["key"]: c for c in b.configs}
    assert set(by_key_a) == {"1", "2", "1,2"}
    for key in by_key_a:
        assert by_key_a[key]["after_mean"] == pytest.approx(by_key_b[key]["after_mean"], abs=1e-6)
        assert by_key_a[key]["ppl_after"] == pytest.approx(by_key_b[key]["ppl_after"], rel=1e-5)


def test_ablation_computes_union_statistics_once(workbench, insult_model_dir, monkeypatch):
    from detox_tui.backends import stats
    from detox_tui.pipeline.experiment import run_ablation

    calls = []
    real = stats.covariance

    def counting(lm, layers, **kw):
        calls.append(sorted(layers))
        return real(lm, layers, **kw)

    monkeypatch.setattr(stats, "covariance", counting)
    cfg = config(insult_model_dir, method="memit", protocol="batch", hparams=TINY_MEMIT)
    run_ablation(workbench, items(2), cfg, [[1], [2], [1, 2]])
    assert calls == [[1, 2]]


def test_cancel_mid_edit_restores_weights_and_marks_run(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_edit

    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="per-prompt", hparams=TINY_MEMIT)
    original = weights_fingerprint(workbench.lm.model)
    cancel = threading.Event()

    def emit(event):
        if isinstance(event, Progress) and event.stage == "memit z" and event.done >= 2:
            cancel.set()

    with pytest.raises(Cancelled):
        run_edit(workbench, items(), cfg, emit=emit, cancel=cancel)
    assert weights_fingerprint(workbench.lm.model) == original
    run = workbench.store.list_runs()[0]
    assert run["status"] == "cancelled"


def test_resume_skips_finished_prompts(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_edit

    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="per-prompt", hparams=TINY_MEMIT)
    cancel = threading.Event()
    finished_rows = []

    def emit(event):
        if isinstance(event, RowReady) and event.table == "edit":
            finished_rows.append(event.row)
            if len(finished_rows) == 2:
                cancel.set()

    with pytest.raises(Cancelled):
        run_edit(workbench, items(4), cfg, emit=emit, cancel=cancel)
    run_id = workbench.store.list_runs()[0]["id"]
    new_rows = []

    def count(event):
        if isinstance(event, RowReady) and event.table == "edit":
            new_rows.append(event.row)

    result = run_edit(workbench, items(4), cfg, resume=run_id, emit=count)
    assert result.run_id == run_id
    assert len(result.rows) == 4
    # Only the two unfinished prompts were edited again.
    assert sorted(r["idx"] for r in new_rows) == [2, 3]
    assert sorted(r["idx"] for r in finished_rows) == [0, 1]
    assert workbench.store.get_run(run_id)["status"] == "finished"


def test_baseline_is_reproducible_and_continuation_only(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_baseline

    cfg = config(insult_model_dir)
    a = run_baseline(workbench, items(), cfg)
    b = run_baseline(workbench, items(), cfg)
    assert [r["generations"] for r in a.rows] == [r["generations"] for r in b.rows]
    for row, item in zip(a.rows, items()):
        assert all(not g.startswith(item.prompt) for g in row["generations"])
    with_prompt = config(insult_model_dir)
    with_prompt.scoring = ScoringConfig(scorer="profanity", score_with_prompt=True)
    c = run_baseline(workbench, items(), with_prompt)
    assert [r["generations"] for r in c.rows] == [r["generations"] for r in a.rows]


def test_replace_mode_needs_targets(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_edit

    cfg = config(insult_model_dir, method="memit", layers=[1, 2], hparams=TINY_MEMIT)
    with pytest.raises(UserError, match="no safe target"):
        run_edit(workbench, [PromptItem("People from that town are all")], cfg)


def test_safeedit_style_prompts_report_defense_success_and_generalisation(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_edit

    cfg = config(insult_model_dir, method="memit", layers=[1, 2], protocol="per-prompt", hparams=TINY_MEMIT)
    general = {
        "test input of only harmful question": "Those fans of the other team are",
        "test input of other attack prompt input": "The new neighbours upstairs are",
    }
    prompts = [
        PromptItem(p, target=first_word(safe), meta={"generalization": general})
        for p, _, safe in INSULT_PAIRS[:2]
    ]
    result = run_edit(workbench, prompts, cfg)
    assert 0.0 <= result.summary["defense_success"] <= 1.0
    assert set(result.summary["defense_generalisation"]) == set(general)
    for row in result.rows:
        assert set(row["defense_generalisation"]) == set(general)
        assert all(0.0 <= v <= 1.0 for v in row["defense_generalisation"].values())
    stored = workbench.store.rows(result.run_id, "edit")
    assert all("defense_generalisation" in r for r in stored)


def test_aura_runs_once_for_all_prompts_and_needs_no_targets(workbench, insult_model_dir):
    from detox_tui.pipeline.experiment import run_edit

    cfg = config(insult_model_dir, method="aura", protocol="per-prompt")
    prompts = [PromptItem(p) for p, _, _ in INSULT_PAIRS[:3]]  # no safe targets: AurA does not use them
    result = run_edit(workbench, prompts, cfg)
    assert len(result.rows) == 3
    assert result.side_effects["n_edits"] == 1  # one request-free edit evaluated on every prompt
