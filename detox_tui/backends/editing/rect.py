"""RECT (Gu et al. 2024, "Model Editing Harms General Abilities of Large Language Models: Regularization to the
Rescue", arXiv:2401.04700): keep the top-k% of a weight delta's entries by relative change |dW_ij| / |W_ij| and set
the rest to zero. It applies to any method's EditDelta; the paper keeps 20%.

An entry whose original weight is zero has an infinite relative change (kept first) unless its change is zero too;
per parameter, ceil(k% x entries) are kept (ties broken by position).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from detox_tui.backends.editing.base import EditDelta
from detox_tui.errors import UserError


def check_rect_percent(percent: float | None, option: str = "RECT's share") -> float | None:
    """None (off) or a share in (0, 100]; anything else is one sentence."""
    if percent is None:
        return None
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < float(percent) <= 100:
        raise UserError(
            f"{option} must be a percentage above 0 and at most 100 (the paper keeps 20), not {percent!r}."
        )
    return float(percent)


def relative_change(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|dW| / |W| in float64: inf where W is 0 and dW is not, 0 where both are."""
    d = delta.detach().to("cpu", torch.float64).abs()
    w = weight.detach().to("cpu", torch.float64).abs()
    out = torch.where(w > 0, d / w.clamp_min(torch.finfo(torch.float64).tiny), torch.full_like(d, math.inf))
    return torch.where(d > 0, out, torch.zeros_like(d))


def rect(delta: EditDelta, model: nn.Module, percent: float) -> EditDelta:
    """A copy of ``delta`` keeping the top ``percent``% entries of each parameter by relative change to ``model``'s
    current (original) weights; the rest are zero. ``info["rect"]`` records the share and what was kept."""
    percent = check_rect_percent(percent)
    assert percent is not None
    params = dict(model.named_parameters())
    kept: dict[str, torch.Tensor] = {}
    counts: dict[str, Any] = {}
    for name, d in delta.deltas.items():
        if name not in params:
            raise UserError(f"The edit touches '{name}', which this model does not have.")
        n = d.numel()
        k = min(n, math.ceil(percent / 100.0 * n))
        ratio = relative_change(d, params[name]).flatten()
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.topk(ratio, k, sorted=False).indices] = True
        kept[name] = torch.where(mask.view_as(d), d, torch.zeros_like(d))
        counts[name] = {"kept": int(k), "entries": int(n)}
    return replace(
        delta,
        deltas=kept,
        info={**delta.info, "rect": {"percent": percent, "parameters": counts}},
        _originals=None,
    )
