"""The headless CLI: JSON output users script against, and one-sentence errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detox_tui.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    from detox_tui.tiny import INSULT_PAIRS

    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"prompt": p, "target": safe, "category": "insult"}) for p, _, safe in INSULT_PAIRS[:3]
        )
    )
    return path


def test_baseline_json_has_rows_with_ci_and_summary(capsys, insult_model_dir, prompt_file):
    rc, out, err = run_cli(
        capsys,
        "baseline",
        "--model",
        str(insult_model_dir),
        "--prompts",
        str(prompt_file),
        "--scorer",
        "profanity",
        "--samples",
        "3",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--json",
    )
    assert rc == 0, err
    data = json.loads(out)
    assert set(data) >= {"run_id", "config", "rows", "summary"}
    assert len(data["rows"]) == 3
    for row in data["rows"]:
        assert {"prompt", "n", "mean", "ci_low", "ci_high", "max", "share_above"} <= set(row)
        assert row["n"] == 3
        assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    # The trained model insults on these prompts: a clearly toxic baseline.
    assert data["summary"]["mean"] > 0.5


def test_baseline_same_seed_gives_identical_table(capsys, insult_model_dir, prompt_file):
    args = [
        "baseline",
        "--model",
        str(insult_model_dir),
        "--prompts",
        str(prompt_file),
        "--scorer",
        "profanity",
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--seed",
        "7",
        "--json",
    ]
    first = json.loads(run_cli(capsys, *args)[1])
    second = json.loads(run_cli(capsys, *args)[1])
    assert [r["generations"] for r in first["rows"]] == [r["generations"] for r in second["rows"]]
    assert [r["mean"] for r in first["rows"]] == [r["mean"] for r in second["rows"]]


def test_runs_list_show_and_export_after_a_baseline(capsys, insult_model_dir, prompt_file, tmp_path):
    rc, out, _ = run_cli(
        capsys,
        "baseline",
        "--model",
        str(insult_model_dir),
        "--prompts",
        str(prompt_file),
        "--scorer",
        "profanity",
        "--samples",
        "2",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--json",
    )
    run_id = json.loads(out)["run_id"]
    rc, out, _ = run_cli(capsys, "runs", "list", "--json")
    assert rc == 0 and run_id in [r["id"] for r in json.loads(out)["runs"]]
    rc, out, _ = run_cli(capsys, "runs", "show", run_id[:12])
    assert rc == 0 and run_id in out
    for fmt in ("csv", "json", "md", "jsonl"):
        target = tmp_path / f"export.{fmt}"
        rc, _, err = run_cli(capsys, "runs", "export", run_id, "--format", fmt, "--out", str(target))
        assert rc == 0, err
        assert target.stat().st_size > 0
    lines = (tmp_path / "export.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2  # one generation per line
    assert "scores" in json.loads(lines[0])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["baseline", "--prompts", "/nonexistent/prompts.csv", "--scorer", "profanity"], "does not exist"),
        (["baseline", "--model", "/nonexistent/model-dir", "--scorer", "profanity"], "model"),
        (
            ["baseline", "--model", "no-such-org/no-such-model-xyz", "--scorer", "profanity"],
            "no-such-model-xyz",
        ),
        (["baseline", "--device", "cuda", "--scorer", "profanity", "--model", "MODEL"], "CUDA"),
        (["baseline", "--scorer", "nonsense-scorer", "--model", "MODEL"], "scorer"),
        (
            ["baseline", "--model", "MODEL", "--scorer", "profanity", "--out", "/nonexistent-dir/x.csv"],
            "Cannot write",
        ),
        (["baseline", "--model", "MODEL", "--scorer", "profanity", "--out", "OUT.xlsx"], "xlsx"),
        (["edit", "--model", "MODEL", "--scorer", "profanity", "--layers", "1,99"], "out of range"),
        (["edit", "--model", "MODEL", "--scorer", "profanity", "--method", "magic"], "magic"),
        (["ablate", "--model", "MODEL", "--scorer", "profanity", "--configs", "1;x"], "configuration"),
        (["runs", "show", "no-such-run"], "no-such-run"),
        (["apply-delta", "/nonexistent/delta.safetensors", "--model", "MODEL"], "does not exist"),
        (["trace", "--prompt", "hello", "--kind", "weird", "--model", "MODEL"], "kind"),
    ],
)
def test_user_errors_are_one_sentence_with_exit_2(
    capsys, args, needle, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "--device" in args and "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    args = [
        str(tiny_model_dir) if a == "MODEL" else str(tmp_path / "out.xlsx") if a == "OUT.xlsx" else a
        for a in args
    ]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert needle.lower() in err.lower()
    assert err.strip().count("\n") == 0  # one line


def test_empty_prompt_file_is_a_user_error(capsys, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    rc, _, err = run_cli(
        capsys, "baseline", "--model", str(tiny_model_dir), "--prompts", str(empty), "--scorer", "profanity"
    )
    assert rc == 2
    assert "empty.txt" in err


def test_console_script_error_has_no_traceback_unless_debug(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DETOX_TUI_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "detox_tui", "baseline", "--prompts", str(tmp_path / "missing.json")]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    assert "missing.json" in plain.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr


TINY_MEMIT_ARGS = ["-H", "mom2_update_weight=100", "-H", "clamp_norm_factor=4", "-H", "n_templates=2"]


def first_word_prompts(tmp_path: Path) -> Path:
    from detox_tui.tiny import INSULT_PAIRS

    path = tmp_path / "first-word.csv"
    lines = ["prompt,target,category"] + [
        f"{p},{' ' + safe.split()[0]},insult" for p, _, safe in INSULT_PAIRS[:2]
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_edit_json_reports_before_after_side_effects_and_stats(capsys, insult_model_dir, tmp_path):
    delta_path = tmp_path / "memit.safetensors"
    rc, out, err = run_cli(
        capsys,
        "edit",
        "--method",
        "memit",
        "--layers",
        "1,2",
        *TINY_MEMIT_ARGS,
        "--batch",
        "--model",
        str(insult_model_dir),
        "--prompts",
        str(first_word_prompts(tmp_path)),
        "--scorer",
        "profanity",
        "--samples",
        "5",
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
        "--save-delta",
        str(delta_path),
        "--json",
    )
    assert rc == 0, err
    data = json.loads(out)
    for row in data["rows"]:
        assert {"mean", "ci_low", "ci_high"} <= set(row["before"]) and {"mean", "ci_low", "ci_high"} <= set(
            row["after"]
        )
        assert {"delta", "reduction", "p_value", "detoxified", "converged", "collapsed", "check"} <= set(row)
        # Both insults replaced by their safe first words: each edit reached its target, each prompt detoxified.
        assert row["detoxified"] and row["converged"] and row["check"]["p_after"] > row["check"]["p_before"]
    assert "collapsed" in data["side_effects"] and "ppl_after" in data["side_effects"]
    s = data["summary"]
    assert {"share_detoxified", "detoxified", "defense_success", "mean_reduction", "wilcoxon_p"} <= set(s)
    assert s["share_detoxified"] == 1.0 and s["detoxified"] == {
        "k": 2,
        "n": 2,
        "share": 1.0,
        "ci_low": pytest.approx(0.342, abs=1e-3),  # Wilson, 2 of 2
        "ci_high": 1.0,
    }
    for when in ("before_metrics", "after_metrics"):
        assert {"expected_max_toxicity", "toxicity_probability", "dist_1", "dist_2", "dist_3"} <= set(s[when])
    assert s["after_metrics"]["toxicity_probability"] < s["before_metrics"]["toxicity_probability"]
    # The saved delta re-applies onto a fresh copy of the model and can be saved as a model.
    (saved,) = data["deltas"]
    rc, out, err = run_cli(
        capsys,
        "apply-delta",
        saved,
        "--model",
        str(insult_model_dir),
        "--device",
        "cpu",
        "--prompt",
        "People from that town are all",
        "--save-model",
        str(tmp_path / "edited"),
    )
    assert rc == 0, err
    assert "kind" in out.split("after:")[1]
    assert (tmp_path / "edited" / "config.json").exists()


def test_ablate_json_lists_every_configuration(capsys, insult_model_dir, tmp_path):
    rc, out, err = run_cli(
        capsys,
        "ablate",
        "--method",
        "memit",
        "--configs",
        "1;2;1,2",
        *TINY_MEMIT_ARGS,
        "--batch",
        "--model",
        str(insult_model_dir),
        "--prompts",
        str(first_word_prompts(tmp_path)),
        "--scorer",
        "profanity",
        "--samples",
        "2",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--json",
    )
    assert rc == 0, err
    data = json.loads(out)
    assert [c["layers"] for c in data["configs"]] == [[1], [2], [1, 2]]
    for c in data["configs"]:
        assert {
            "share_detoxified",
            "share_went_down",
            "mean_reduction",
            "n_not_converged",
            "collapsed",
        } <= set(c)
    assert data["summary"]["best"] in (None, "1", "2", "1,2")


def test_trace_json_and_csv(capsys, insult_model_dir, tmp_path):
    target = tmp_path / "trace.csv"
    rc, out, err = run_cli(
        capsys,
        "trace",
        "--prompt",
        "People from that town are all",
        "--model",
        str(insult_model_dir),
        "--device",
        "cpu",
        "--noise-samples",
        "3",
        "--continuation-tokens",
        "2",
        "--out",
        str(target),
        "--json",
    )
    assert rc == 0, err
    data = json.loads(out)
    assert data["layers"] == 4 and len(data["scores"]) == 4
    assert all(len(row) == len(data["tokens"]) for row in data["scores"])
    assert data["continuation"].strip().startswith("stupid")
    assert target.read_text().startswith("layer,")
    assert data["noise"] > 0  # 3 x the prompt tokens' embedding std, recorded
    # An explicit noise level is used and recorded as given.
    rc, out, err = run_cli(
        capsys,
        *("trace", "--prompt", "People from that town are all", "--model", str(insult_model_dir)),
        *(
            "--device",
            "cpu",
            "--noise-samples",
            "2",
            "--continuation-tokens",
            "2",
            "--noise",
            "0.25",
            "--json",
        ),
    )
    assert rc == 0, err
    assert json.loads(out)["noise"] == 0.25


TINY_ALPHA_ARGS = ["-H", "l2=1", "-H", "clamp_norm_factor=4", "-H", "n_templates=2"]


def test_alphaedit_ablates_and_exports_from_the_cli(capsys, insult_model_dir, tmp_path):
    common = [
        "--model",
        str(insult_model_dir),
        "--prompts",
        str(first_word_prompts(tmp_path)),
        "--scorer",
        "profanity",
    ]
    common += ["--samples", "2", "--max-new-tokens", "4", "--device", "cpu"]
    rc, out, err = run_cli(
        capsys, "ablate", "--method", "alphaedit", "--configs", "1;1,2", *TINY_ALPHA_ARGS, *common, "--json"
    )
    assert rc == 0, err
    data = json.loads(out)
    assert [c["layers"] for c in data["configs"]] == [[1], [1, 2]]
    target = tmp_path / "alpha.json"
    rc, _, err = run_cli(capsys, "runs", "export", data["run_id"], "--format", "json", "--out", str(target))
    assert rc == 0, err
    meta = json.loads(target.read_text())["meta"]
    assert meta["config"]["method"] == "alphaedit" and meta["config"]["hparams"]["l2"] == 1
    # The summary keeps what each configuration really ran with: the preset under the overrides, resolved.
    resolved = meta["summary"]["hparams"]
    assert set(resolved) == {"1", "1,2"} and resolved["1,2"]["layers"] == [1, 2]
    assert resolved["1"]["nullspace_threshold"] == 0.02 and resolved["1"]["l2"] == 1.0
    # A threshold under every eigenvalue leaves AlphaEdit nothing to write: one sentence, exit 2.
    rc, _, err = run_cli(
        capsys,
        "edit",
        "--method",
        "alphaedit",
        "--layers",
        "1",
        *TINY_ALPHA_ARGS,
        "-H",
        "nullspace_threshold=1e-12",
        *common,
    )
    assert rc == 2 and "raise nullspace_threshold" in err and "Traceback" not in err
