"""ROME (Meng et al. 2022): a C^-1-preconditioned rank-one update of one layer's out-projection per request.

Two key forms (hyperparameter ``key_form``), with k_j = the out-projection input at the key token of
template j, k_avg = the flat mean of k_j over all templates (kmeng01/rome compute_u), k_bare = k_j of
the bare "{}" template, u = C^-1 k_avg and v* = the optimised MLP output:

- "reference": exactly kmeng01/rome (compute_u / compute_v): Delta W = (v* - W k_bare - b) u^T / (u^T k_bare).
  The edited layer maps k_bare to v*.
- "consistent": r-ROME, Gupta et al. 2024, "Rebuilding ROME: Resolving Model Collapse during Sequential
  Model Editing" (EMNLP 2024, arXiv:2403.07175; scalable-model-editing/rebuilding-rome with
  enable_random_prefix_keys): the same averaged key in the residual and the denominator,
  Delta W = (v* - W k_avg - b) u^T / (u^T k_avg). The edited layer maps k_avg to v*.

The default is "consistent": Gupta et al. show that the reference's mix of keys is what produces
"disabling edits" (abnormally large update norms, immediate model collapse), and that the
consistent form removes the collapse in sequential editing while improving generalisation and locality.
This editor applies several requests one after another, which is that sequential setting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from detox_tui.backends.editing.base import Capabilities, EditContext, EditDelta, EditRequest
from detox_tui.backends.editing.common import (
    compute_targets,
    context_templates,
    solve_psd,
    template_hparams,
    template_keys,
)
from detox_tui.backends.editing.memit import layer_covariances, linalg_device, weight_name
from detox_tui.backends.editing.presets import PresetHparams
from detox_tui.backends.models import linear_weight_out_in, to_param_layout
from detox_tui.events import check_cancel

log = logging.getLogger(__name__)


class RomeEditor(PresetHparams, Capabilities):
    """Single-layer rank-one edits; several requests are applied one after another on the edited model."""

    name = "rome"
    title = "ROME"
    layers_key = "layer"
    single_layer = True
    needs_covariance = True
    request_free = False
    convergence_advice = "another (often later) layer, a larger clamp_norm_factor, or more v_num_grad_steps"

    def compute(
        self,
        lm: Any,
        requests: Sequence[EditRequest],
        hparams: Mapping[str, Any],
        ctx: EditContext,
    ) -> EditDelta:
        hp = self.resolve_hparams(lm, hparams)
        layer = int(hp["layer"])
        key_form = str(hp.get("key_form", "consistent"))
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
        divisions: list[float] = []
        bare = templates.index("{}") if "{}" in templates else 0
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
                keys = template_keys(lm, layer, [req], templates)[0].to(dev)  # [n_templates, d_mlp]
                k_avg = keys.mean(dim=0)  # flat over all templates, as kmeng01/rome compute_u
                k_res = keys[bare] if key_form == "reference" else k_avg
                v_star = (v.init + v.delta)[0].to(dev, torch.float64)
                with torch.no_grad():
                    weight = linear_weight_out_in(module, lm.spec).to(dev, torch.float64)
                    bias = getattr(module, "bias", None)
                    out_k = weight @ k_res + (bias.to(dev, torch.float64) if bias is not None else 0.0)
                u = solve_psd(cov, k_avg)  # C^-1 k_avg (the reference normalises it; the scale cancels)
                division = torch.dot(u, k_res)
                if float(division) <= 0:
                    log.warning("rome request %d: non-positive denominator %.4g", i + 1, float(division))
                divisions.append(float(division / u.norm()))  # the reference's "division factor"
                # Delta W = (v* - W k - b) u^T / (u^T k): the new layer maps k (k_bare or k_avg) to v*.
                total += torch.outer(v_star - out_k, u) / division
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
            info={
                "v_loss": losses,
                "v_steps": steps,
                "request_loss": losses,
                "request_steps": steps,
                "templates": templates,
                "key_form": key_form,
                "division_factor": divisions,
            },
        )
