"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's keys, targets and residual spreading, with the update projected onto
the null space of the preserved keys so that what the model already does on them is kept.

Per edited layer l, with K1 the edited requests' keys (columns), R the residual of the z targets spread over the
remaining layers as in MEMIT, K_p the keys of earlier sequential batches and P the projector onto the null space of
the preserved keys' second moment C_l = E[k k^T] (the eigenvectors whose eigenvalue is below
``nullspace_threshold``, an absolute threshold as in the authors' code):

    Delta_l = R K1^T P (K_p K_p^T P + K1 K1^T P + l2 I)^-1

which the authors' code (jianghoucheng/AlphaEdit, AlphaEdit_main.py) solves as the transpose of
solve(P (K1 K1^T + K_p K_p^T) + l2 I, P K1 R^T). Because Delta = Delta P, the outputs on the preserved keys move by
at most ||Delta||_F^2 x nullspace_threshold in mean square: tr(Delta C Delta^T) = tr(Delta P C P Delta^T).

``sequential_batch`` > 0 edits the requests in batches of that size one after another, each on the weights the
previous batches left, with the keys of the batches already written (read after their update, as the authors' code
does) in K_p; 0 edits them all in one batch. Every call starts from the model it is given and an empty K_p, so in
the per-prompt protocol each prompt starts from the original weights and an empty edit memory.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detox_tui.backends.editing.base import Capabilities, EditContext, EditDelta, EditRequest
from detox_tui.backends.editing.common import (
    compute_keys,
    compute_targets,
    context_templates,
    template_hparams,
)
from detox_tui.backends.editing.memit import layer_covariances, linalg_device, write_layers
from detox_tui.backends.editing.presets import PresetHparams
from detox_tui.backends.stats import load_tensor_cache, save_tensor_cache
from detox_tui.errors import UserError
from detox_tui.events import check_cancel

log = logging.getLogger(__name__)

PROJECTOR_FORMAT = "detox-tui-nullspace/1"


@dataclass(frozen=True)
class NullSpace:
    """The projector P onto the null space of one layer's preserved-key second moment, and how it was cut."""

    projector: torch.Tensor  # [d_mlp, d_mlp], float64
    dim: int  # eigenvalues below the threshold
    threshold: float
    smallest: float  # the smallest eigenvalue of C
    largest_kept: float | None  # the largest eigenvalue below the threshold (None when there is none)


def null_space(cov: torch.Tensor, threshold: float) -> NullSpace:
    """P = U U^T over the eigenvectors of the symmetric PSD ``cov`` whose eigenvalue is below ``threshold``.

    The authors take the left singular vectors of C (float32); for a PSD matrix they are its eigenvectors and the
    singular values its eigenvalues, so this uses the symmetric eigendecomposition in float64.
    """
    cov = cov.to(torch.float64)
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    keep = evals < threshold
    basis = evecs[:, keep]
    dim = int(keep.sum())
    return NullSpace(
        projector=basis @ basis.T,
        dim=dim,
        threshold=float(threshold),
        smallest=float(evals[0]),
        largest_kept=float(evals[keep].max()) if dim else None,
    )


def alphaedit_update(
    keys: torch.Tensor,
    resid: torch.Tensor,
    projector: torch.Tensor,
    l2: float,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's update [d_model, d_mlp] from the edited keys [n, d_mlp], their residuals [n, d_model], P, l2
    and the keys of earlier batches [m, d_mlp] (K_p; None: none).

    P (K1 K1^T + K_p K_p^T) is formed as (P K) K^T with K = [K1, K_p], O(d_mlp^2 (n + m)) instead of a d_mlp^3
    product, and K_p is kept as keys rather than a d_mlp x d_mlp sum.
    """
    k = keys if previous is None else torch.cat([keys, previous])  # [n + m, d_mlp]
    eye = torch.eye(k.shape[1], dtype=k.dtype, device=k.device)
    lhs = (projector @ k.T) @ k + l2 * eye
    rhs = projector @ (keys.T @ resid)  # P K1 R^T, with R^T = resid
    return torch.linalg.solve(lhs, rhs).T


def _digest(cov: torch.Tensor, threshold: float) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(PROJECTOR_FORMAT.encode())
    h.update(repr(float(threshold)).encode())
    h.update(str(tuple(cov.shape)).encode())
    h.update(
        memoryview(cov.detach().to("cpu", torch.float64).contiguous().numpy())
    )  # no copy of a CPU float64 C
    return h.hexdigest()


def _load_projector(path: Path, d: int) -> NullSpace | None:
    cached = load_tensor_cache(path, "projector", PROJECTOR_FORMAT, (d, d))
    if cached is None:
        return None
    projector, meta = cached
    try:
        largest = meta.get("largest_kept", "")
        return NullSpace(
            projector=projector,
            dim=int(meta["dim"]),
            threshold=float(meta["threshold"]),
            smallest=float(meta["smallest"]),
            largest_kept=float(largest) if largest else None,
        )
    except (KeyError, ValueError) as exc:  # metadata from another writer: recomputed, never trusted
        log.warning("ignoring the null-space cache %s (%s)", path, exc)
        return None


def _save_projector(path: Path, ns: NullSpace) -> None:
    meta = {
        "dim": str(ns.dim),
        "threshold": repr(ns.threshold),
        "smallest": repr(ns.smallest),
        "largest_kept": "" if ns.largest_kept is None else repr(ns.largest_kept),
    }
    save_tensor_cache(path, "projector", ns.projector, PROJECTOR_FORMAT, meta)


def layer_null_spaces(
    lm: Any, layers: Sequence[int], threshold: float, ctx: EditContext
) -> dict[int, NullSpace]:
    """P per layer from the layers' covariance (ctx's provider or backends.stats), cached beside the statistics.

    The cache key is a digest of C itself and the threshold, so a projector is reused exactly when it would be
    recomputed from the same statistics (same model, layer, corpus and token budget); within one run the context
    also keeps the projectors it has computed (``ctx.extra``), so the per-prompt protocol computes each once.
    """
    covs = layer_covariances(lm, layers, ctx)
    memo: dict[str, NullSpace] = ctx.extra.setdefault("alphaedit_null_spaces", {})
    out: dict[int, NullSpace] = {}
    for layer in layers:
        check_cancel(ctx.cancel)
        cov = covs[layer]
        key = _digest(cov, threshold)
        ns = memo.get(key)
        path = Path(ctx.cache_dir) / "stats" / f"nullspace-{key}.safetensors" if ctx.cache_dir else None
        if ns is None and path is not None:
            ns = _load_projector(path, cov.shape[0])
        if ns is None:
            ns = null_space(cov, threshold)
            if path is not None:
                _save_projector(path, ns)
        memo[key] = ns
        if ns.dim == 0:
            raise UserError(
                f"AlphaEdit has nothing to write into layer {layer}: no eigenvalue of its key statistics is below "
                f"the null-space threshold {threshold:g} (the smallest is {ns.smallest:.3g}); raise "
                "nullspace_threshold."
            )
        log.info(
            "alphaedit layer %d: null space of dimension %d/%d (threshold %g)",
            layer,
            ns.dim,
            cov.shape[0],
            threshold,
        )
        out[layer] = ns
    return out


class AlphaEditEditor(PresetHparams, Capabilities):
    """MEMIT's edit of layers R, projected onto the null space of the preserved keys; weights restored on return."""

    name = "alphaedit"
    title = "AlphaEdit"
    layers_key = "layers"
    needs_covariance = True
    request_free = False
    convergence_advice = (
        "later or more layers, a larger clamp_norm_factor, more v_num_grad_steps, a larger nullspace_threshold "
        "or a smaller l2"
    )

    def compute(
        self,
        lm: Any,
        requests: Sequence[EditRequest],
        hparams: Mapping[str, Any],
        ctx: EditContext,
    ) -> EditDelta:
        hp = self.resolve_hparams(lm, hparams)
        if not requests:
            raise UserError("There are no edit requests.")
        layers = sorted(hp["layers"])
        last = layers[-1]
        threshold = float(hp["nullspace_threshold"])
        l2 = float(hp["l2"])
        size = int(hp["sequential_batch"]) or len(requests)
        batches = [list(requests[i : i + size]) for i in range(0, len(requests), size)]
        n_templates, length = template_hparams(hp)
        templates = context_templates(lm, n=n_templates, length=length)
        spaces = layer_null_spaces(lm, layers, threshold, ctx)
        dev = linalg_device(lm)
        d_mlp = int(spaces[last].projector.shape[0])
        previous: dict[int, torch.Tensor | None] = {layer: None for layer in layers}  # K_p per layer, as keys
        totals: dict[str, torch.Tensor] = {}
        applied: list[EditDelta] = []
        losses: list[float] = []
        steps: list[int] = []
        try:
            for b, batch in enumerate(batches):
                stage = "alphaedit z" if len(batches) == 1 else f"alphaedit z (batch {b + 1}/{len(batches)})"
                z = compute_targets(
                    lm,
                    batch,
                    lm.spec.block_path(last),
                    templates,
                    hp,
                    emit=ctx.emit,
                    cancel=ctx.cancel,
                    stage=stage,
                )
                losses.extend(z.losses)
                steps.extend(z.steps)
                zs = z.target.to("cpu", torch.float64)

                def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
                    projector = spaces[layer].projector.to(dev)  # one layer's P on the device at a time
                    return alphaedit_update(keys, resid, projector, l2, previous[layer])

                written = write_layers(lm, batch, layers, templates, zs, solve, self.name, ctx, applied)
                for name, delta in written.items():
                    totals[name] = (
                        totals.get(name, torch.zeros_like(delta, dtype=torch.float64)) + delta.double()
                    )
                if b + 1 < len(
                    batches
                ):  # the batch's keys, read on the weights it left, join the edit memory
                    for layer in layers:
                        keys = compute_keys(lm, layer, batch, templates).to(dev, torch.float64)
                        prior = previous[layer]
                        previous[layer] = keys if prior is None else torch.cat([prior, keys])
            check_cancel(ctx.cancel)
        finally:
            for step in reversed(applied):
                step.revert(lm.model)
        return EditDelta(
            deltas={name: total.to(torch.float32) for name, total in totals.items()},
            method=self.name,
            model_name=lm.name,
            layers=layers,
            hparams=dict(hp),
            requests=[r.to_dict() for r in requests],
            info={
                "z_loss": losses,
                "z_steps": steps,
                "request_loss": losses,
                "request_steps": steps,
                "templates": templates,
                "null_space_dim": {str(layer): spaces[layer].dim for layer in layers},
                "d_mlp": d_mlp,
                "sequential_batches": len(batches),
            },
        )
