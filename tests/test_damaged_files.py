"""Files the tool reads back: nothing in them executes, and damage is refused (or, for caches, recomputed).

A crafted Detoxify checkpoint never runs its pickle payload; edit deltas and the AurA expertise cache carry a
checksum and are checked against the model; a model folder without a usable tokenizer, truncated weights, malformed
prompt files, a --save-delta folder and a read-only cache each end in one sentence (or one warning) instead of a
traceback, a wrong result or a silently empty run.
"""

from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from detoxify_fixture import build_tiny_detoxify

from detox_tui.cli import main
from detox_tui.errors import UserError

TINY_RUN = ("--samples", "1", "--max-new-tokens", "2", "--limit", "1", "--device", "cpu")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------- nothing executes


class _CreatesFile:
    """Unpickling this runs open(path, "w"): a stand-in for any payload a crafted checkpoint could carry."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory):
    return build_tiny_detoxify(tmp_path_factory.mktemp("detoxify"), train_steps=0)


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"config": _CreatesFile(marker), "state_dict": {}}, path)
    return path


def _benign_pickle_checkpoint(source: Path, path: Path) -> Path:
    """A legitimate Detoxify checkpoint that also holds an object only pickle can build (a Fraction)."""
    data = torch.load(source, weights_only=True)
    data["config"]["note"] = Fraction(1, 3)
    torch.save(data, path)
    return path


def test_a_crafted_checkpoint_never_runs_its_payload_and_is_refused_in_one_line(
    capsys, tiny_model_dir, tiny_detoxify, tmp_path
):
    _, config_dir = tiny_detoxify
    marker = tmp_path / "payload-ran"
    evil = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    rc, _, err = run_cli(
        capsys,
        "baseline",
        "--model",
        str(tiny_model_dir),
        "--scorer",
        f"detoxify:{evil}@{config_dir}",
        *TINY_RUN,
    )
    assert not marker.exists()
    assert rc == 2
    (line,) = error_lines(err)
    assert str(evil) in line and "pickle" in line and "--trust-checkpoint" in line


def test_the_hub_weights_are_opened_without_pickle_too(tiny_detoxify, tmp_path, monkeypatch):
    from detox_tui.backends.scorers import detoxify_scorer

    marker = tmp_path / "payload-ran"
    evil = _crafted_checkpoint(tmp_path / "toxic_debiased-c7548aa0.ckpt", marker)
    monkeypatch.setattr(detoxify_scorer, "cached_checkpoint_path", lambda variant: evil)
    with pytest.raises(UserError, match="pickle"):
        detoxify_scorer.DetoxifyScorer("unbiased", huggingface_config_path=tiny_detoxify[1])
    assert not marker.exists()


def test_a_legitimate_local_detoxify_checkpoint_still_loads_and_scores(capsys, tiny_model_dir, tiny_detoxify):
    checkpoint, config_dir = tiny_detoxify
    rc, out, err = run_cli(
        capsys,
        "baseline",
        "--model",
        str(tiny_model_dir),
        "--scorer",
        f"detoxify:{checkpoint}@{config_dir}",
        *TINY_RUN,
        "--json",
    )
    assert rc == 0, err
    data = json.loads(out)
    assert data["config"]["scoring"]["trust_checkpoint"] is False
    assert all(0.0 <= row["mean"] <= 1.0 for row in data["rows"])


def test_a_checkpoint_that_needs_pickle_loads_only_with_trust_checkpoint_and_a_warning(
    capsys, caplog, tiny_model_dir, tiny_detoxify, tmp_path
):
    checkpoint, config_dir = tiny_detoxify
    pickled = _benign_pickle_checkpoint(checkpoint, tmp_path / "pickled.ckpt")
    scorer = f"detoxify:{pickled}@{config_dir}"
    rc, _, err = run_cli(capsys, "baseline", "--model", str(tiny_model_dir), "--scorer", scorer, *TINY_RUN)
    assert rc == 2
    (line,) = error_lines(err)
    assert "--trust-checkpoint" in line and str(pickled) in line

    with caplog.at_level(logging.WARNING):
        rc, out, err = run_cli(
            capsys,
            "--trust-checkpoint",
            "baseline",
            "--model",
            str(tiny_model_dir),
            "--scorer",
            scorer,
            *TINY_RUN,
            "--json",
        )
    assert rc == 0, err
    assert json.loads(out)["config"]["scoring"]["trust_checkpoint"] is True
    warnings = [r.getMessage() for r in caplog.records if "pickle" in r.getMessage()]
    assert len(warnings) == 1 and str(pickled) in warnings[0] and "\n" not in warnings[0]


@pytest.mark.parametrize("content", [b"not a checkpoint", b""], ids=["garbage", "empty"])
def test_a_damaged_checkpoint_is_one_sentence(tmp_path, tiny_detoxify, content):
    from detox_tui.backends.scorers import load_scorer

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(UserError, match="damaged or not a PyTorch checkpoint") as info:
        load_scorer(f"detoxify:{bad}@{tiny_detoxify[1]}")
    assert str(bad) in str(info.value)


def test_a_truncated_detoxify_checkpoint_is_one_sentence(tmp_path, tiny_detoxify):
    from detox_tui.backends.scorers import load_scorer

    checkpoint, config_dir = tiny_detoxify
    data = checkpoint.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged or not a PyTorch checkpoint"):
        load_scorer(f"detoxify:{cut}@{config_dir}")


def test_a_checkpoint_naming_a_class_that_is_not_a_classifier_is_refused(tmp_path, tiny_detoxify):
    from detox_tui.backends.scorers import load_scorer

    checkpoint, config_dir = tiny_detoxify
    data = torch.load(checkpoint, weights_only=True)
    data["config"]["arch"]["args"]["model_name"] = "AutoModel"
    odd = tmp_path / "odd.ckpt"
    torch.save(data, odd)
    with pytest.raises(UserError, match="not a sequence classification model class"):
        load_scorer(f"detoxify:{odd}@{config_dir}")
