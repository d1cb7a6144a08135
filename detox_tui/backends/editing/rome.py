"""ROME (Meng et al. 2022): a C^-1-preconditioned rank-one update of one layer's out-projection per request."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from detox_tui.backends.editing.base import EditContext, EditDelta, EditRequest
from detox_tui.backends.editing.common import (
    compute_keys,
    compute_targets,
    context_templates,
    solve_psd,
    template_hparams,
)
from detox_tui.backends.editing.memit import layer_covariances, linalg_device, weight_name
from detox_tui.backends.editing.presets import PresetHparams
from detox_tui.backends.models import linear_weight_out_in, to_param_layout
from detox_tui.pipeline.events import check_cancel

log = logging.getLogger(__name__)


class RomeEditor(PresetHparams):
    """Single-layer rank-one edits; several requests are applied one after another on the edited model."""

    name = "rome"

    def compute(
        self,
        lm: Any,
        requests: Sequence[EditRequest],
        hparams: Mapping[str, Any],
        ctx: EditContext,
    ) -> EditDelta:
        hp = self.resolve_hparams(lm, hparams)
        layer = int(hp["layer"])
        n_templates, length = template_hparams(hp)
        templates = context_templates(lm, n=n_templates, length=length)
        cov = layer_covariances(lm, [layer], ctx)[layer]
        dev = linalg_device(lm)
        cov = cov.to(dev, torch.float64)
        module = lm.module(lm.spec.mlp_out_path(layer))
        name = weight_name(lm, layer)
        total = torch.zeros((lm.d_model, lm.d_mlp), dtype=torch.float64, device=dev)
        losses: list[float] = []
        steps: list[int] = []
        applied: EditDelta | None = None
        try:
            for i, req in enumerate(requests):
                check_cancel(ctx.cancel)
                v = compute_targets(
                    lm,
                    [req],
                    lm.spec.mlp_path(layer),
                    templates,
                    hp,
                    emit=ctx.emit,
                    cancel=ctx.cancel,
                    stage=f"rome v {i + 1}/{len(requests)}",
                )
                losses += v.losses
                steps += v.steps
                k_star = compute_keys(lm, layer, [req], templates)[0].to(dev)
                v_star = (v.init + v.delta)[0].to(dev, torch.float64)
                with torch.no_grad():
                    weight = linear_weight_out_in(module, lm.spec).to(dev, torch.float64)
                    bias = getattr(module, "bias", None)
                    out_k = weight @ k_star + (bias.to(dev, torch.float64) if bias is not None else 0.0)
                u = solve_psd(cov, k_star)  # C^-1 k*
                # Delta W = (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*): the new layer maps k* to v*.
                total += torch.outer(v_star - out_k, u) / torch.dot(u, k_star)
                if applied is not None:
                    applied.revert(lm.model)
                applied = EditDelta(
                    deltas={name: to_param_layout(total.to(torch.float32), lm.spec).cpu()},
                    method=self.name,
                    model_name=lm.name,
                )
                applied.apply(lm.model)
        finally:
            if applied is not None:
                applied.revert(lm.model)
        delta = to_param_layout(total.to(torch.float32), lm.spec).cpu()
        return EditDelta(
            deltas={name: delta},
            method=self.name,
            model_name=lm.name,
            layers=[layer],
            hparams=dict(hp),
            requests=[r.to_dict() for r in requests],
            info={"v_loss": losses, "v_steps": steps, "templates": templates},
        )
