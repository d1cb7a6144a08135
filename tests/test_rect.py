"""RECT on any weight delta: the top-k% entries by relative change are kept exactly, the rest are zero, and a run
records it; bad shares are one sentence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from detox_tui.backends.editing.base import EditDelta
from detox_tui.backends.editing.rect import rect, relative_change
from detox_tui.cli import main
from detox_tui.errors import UserError


def _model_and_delta() -> tuple[nn.Module, EditDelta]:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    with torch.no_grad():
        model[0].weight[0, :3] = 0.0  # zero weights: their changes are infinitely relative
    deltas = {
        "0.weight": torch.randn(6, 8, generator=gen),
        "1.weight": torch.randn(4, 6, generator=gen),
    }
    deltas["0.weight"][0, 2] = 0.0  # no change on a zero weight: never counted as a change
    return model, EditDelta(deltas=deltas, method="test", model_name="toy")


@pytest.mark.parametrize("percent", [20.0, 50.0, 7.5])
def test_rect_keeps_exactly_the_largest_relative_changes(percent):
    model, delta = _model_and_delta()
    out = rect(delta, model, percent)
    params = dict(model.named_parameters())
    for name, d in delta.deltas.items():
        kept = out.deltas[name]
        k = math.ceil(percent / 100 * d.numel())
        mask = kept != 0
        assert int(mask.sum()) == k
        assert torch.equal(kept[mask], d[mask])  # kept entries are unchanged, not rescaled
        ratio = relative_change(d, params[name])
        assert float(ratio[mask].min()) >= float(ratio[~mask].max())
        assert out.info["rect"]["parameters"][name] == {"kept": k, "entries": d.numel()}
    # The changes of zero weights (infinite relative change) are kept first; a zero change on one is not.
    assert torch.equal(out.deltas["0.weight"][0, :2], delta.deltas["0.weight"][0, :2])
    assert out.info["rect"]["percent"] == percent and out.method == "test"
    assert not out.applied


def test_rect_at_100_percent_is_the_delta_itself_and_bad_shares_are_refused():
    model, delta = _model_and_delta()
    out = rect(delta, model, 100)
    assert all(torch.equal(out.deltas[k], delta.deltas[k]) for k in delta.deltas)
    for bad in (0, -5, 120, float("nan")):
        with pytest.raises(UserError, match="percentage above 0 and at most 100"):
            rect(delta, model, bad)


def test_an_edit_with_rect_saves_a_sparse_delta_and_records_the_share(capsys, insult_model_dir, tmp_path):
    from test_cli import TINY_MEMIT_ARGS, first_word_prompts

    delta_path = tmp_path / "memit.safetensors"
    args = ["edit", "--method", "memit", "--layers", "1", *TINY_MEMIT_ARGS, "--batch", "--rect", "20"]
    args += ["--model", str(insult_model_dir), "--prompts", str(first_word_prompts(tmp_path)), "--scorer"]
    args += ["profanity", "--samples", "2", "--max-new-tokens", "4", "--device", "cpu"]
    args += ["--save-delta", str(delta_path), "--json"]
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    data = json.loads(out)
    saved = EditDelta.load(data["deltas"][0])
    (tensor,) = saved.deltas.values()
    assert int((tensor != 0).sum()) == math.ceil(0.2 * tensor.numel())
    assert saved.info["rect"]["percent"] == 20.0
    rc = main(["runs", "show", data["run_id"], "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert rc == 0 and json.dumps(shown).count('"rect": 20.0') >= 1
    rc = main([*args[:-3], "--rect", "0"])
    assert rc == 2 and "--rect must be a percentage" in capsys.readouterr().err
