"""MEMIT (Meng et al. 2022): batched z optimisation at the last edited layer, float64 least squares per layer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from detox_tui.backends.editing.base import Capabilities, EditContext, EditDelta, EditRequest
from detox_tui.backends.editing.common import (
    compute_keys,
    compute_targets,
    context_templates,
    module_output_at_key,
    solve_psd,
    template_hparams,
)
from detox_tui.backends.editing.presets import PresetHparams
from detox_tui.backends.models import to_param_layout
from detox_tui.events import Progress, check_cancel

log = logging.getLogger(__name__)


def weight_name(lm: Any, layer: int) -> str:
    """The state-dict name of layer ``layer``'s out-projection weight."""
    return f"{lm.spec.mlp_out_path(layer)}.weight"


def linalg_device(lm: Any) -> torch.device:
    """Where float64 linear algebra runs: the model's device, except MPS (no float64 there)."""
    return torch.device("cpu") if lm.device.type == "mps" else lm.device


def layer_covariances(lm: Any, layers: Sequence[int], ctx: EditContext) -> dict[int, torch.Tensor]:
    """C_l for ``layers`` from the context's provider, or computed (and cached) by backends.stats."""
    if ctx.covariance is not None:
        return ctx.covariance(lm, list(layers))
    from detox_tui.backends.stats import covariance

    return covariance(
        lm,
        list(layers),
        corpus=ctx.stats_corpus,
        tokens=ctx.stats_tokens,
        cache_dir=ctx.cache_dir,
        emit=ctx.emit,
        cancel=ctx.cancel,
    )


def write_layers(
    lm: Any,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    templates: Sequence[str],
    zs: torch.Tensor,
    solve: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    method: str,
    ctx: EditContext,
    applied: list[EditDelta],
) -> dict[str, torch.Tensor]:
    """MEMIT's spreading of the z targets ``zs`` over ``layers``, lowest first, on the weights as they are.

    Per layer: the requests' keys [n, d_mlp] (float64), the residual of the z targets at the last layer divided by
    the layers left [n, d_model], ``solve(layer, keys, resid)`` -> the update [d_model, d_mlp] (out, in), applied
    at once so the next layer sees it; each applied step is appended to ``applied`` for the caller to revert.
    Returns the per-parameter deltas (float32, the parameter's layout).
    """
    dev = linalg_device(lm)
    last = layers[-1]
    deltas: dict[str, torch.Tensor] = {}
    for j, layer in enumerate(layers):
        check_cancel(ctx.cancel)
        keys = compute_keys(lm, layer, requests, templates).to(dev)  # [n, d_mlp]
        current = module_output_at_key(lm, lm.spec.block_path(last), requests)
        resid = ((zs - current) / (len(layers) - j)).to(dev)  # [n, d_model]
        update = solve(layer, keys, resid)
        delta = to_param_layout(update.to(torch.float32), lm.spec).cpu()
        step = EditDelta(deltas={weight_name(lm, layer): delta}, method=method, model_name=lm.name)
        step.apply(lm.model)
        applied.append(step)
        deltas[weight_name(lm, layer)] = delta
        log.info("%s layer %d: ||dW|| = %.4g", method, layer, float(update.norm()))
        ctx.emit(Progress(f"{method} layers", j + 1, len(layers), f"layer {layer}"))
    return deltas


class MemitEditor(PresetHparams, Capabilities):
    """Mass edit of the out-projections of layers R; weights are restored before ``compute`` returns."""

    name = "memit"
    title = "MEMIT"
    layers_key = "layers"
    needs_covariance = True
    request_free = False
    convergence_advice = (
        "later or more layers, a larger clamp_norm_factor, a smaller mom2_update_weight, "
        "or more v_num_grad_steps"
    )

    def compute(
        self,
        lm: Any,
        requests: Sequence[EditRequest],
        hparams: Mapping[str, Any],
        ctx: EditContext,
    ) -> EditDelta:
        hp = self.resolve_hparams(lm, hparams)
        layers = sorted(hp["layers"])
        last = layers[-1]
        n_templates, length = template_hparams(hp)
        templates = context_templates(lm, n=n_templates, length=length)
        z = compute_targets(
            lm, requests, lm.spec.block_path(last), templates, hp, emit=ctx.emit, cancel=ctx.cancel
        )
        zs = z.target.to("cpu", torch.float64)
        covs = layer_covariances(lm, layers, ctx)
        dev = linalg_device(lm)
        lam = float(hp["mom2_update_weight"])

        def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
            gram = lam * covs[layer].to(dev, torch.float64) + keys.T @ keys
            # Delta W = resid K^T (lambda C + K K^T)^-1, with K = keys^T; the matrix is symmetric.
            return resid.T @ solve_psd(gram, keys.T).T  # [d_model, d_mlp] (out, in)

        applied: list[EditDelta] = []
        try:
            deltas = write_layers(lm, requests, layers, templates, zs, solve, self.name, ctx, applied)
            check_cancel(ctx.cancel)
        finally:
            for step in reversed(applied):
                step.revert(lm.model)
        return EditDelta(
            deltas=deltas,
            method=self.name,
            model_name=lm.name,
            layers=layers,
            hparams=dict(hp),
            requests=[r.to_dict() for r in requests],
            info={
                "z_loss": z.losses,
                "z_steps": z.steps,
                "request_loss": z.losses,
                "request_steps": z.steps,
                "templates": templates,
            },
        )
