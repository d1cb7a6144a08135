"""Constrained fine-tuning (FT-M / FT-L) of chosen out-projections with an L-infinity norm constraint."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from detox_tui.backends.chat import prompt_ids
from detox_tui.backends.editing.base import Capabilities, EditContext, EditDelta, EditRequest
from detox_tui.backends.editing.memit import weight_name
from detox_tui.backends.editing.presets import PresetHparams
from detox_tui.backends.models import to_param_layout
from detox_tui.errors import UserError
from detox_tui.events import Progress, check_cancel

log = logging.getLogger(__name__)

STOP_LOSS = 1e-2


def _rows(lm: Any, requests: Sequence[EditRequest], objective: str):
    """Right-padded rows and, per target token, (row, position, token id, request)."""
    rows, tgt_rows, tgt_pos, tgt_ids, tgt_req = [], [], [], [], []
    for r, req in enumerate(requests):
        prompt = prompt_ids(lm, req.prompt)  # wrapped in the chat template when the run uses one
        text = req.toxic if req.mode == "erase" else req.target
        target = list(lm.tokenizer(text or "", add_special_tokens=False)["input_ids"])
        if not prompt or not target:
            raise UserError(f"The prompt '{req.prompt}' or its continuation tokenises to nothing.")
        row = len(rows)
        if objective == "ft-m":  # teacher forcing: token j is predicted after prompt + target[:j]
            rows.append(prompt + target[:-1])
            positions = [len(prompt) - 1 + j for j in range(len(target))]
        else:  # ft-l: every target token is read at the prompt's last position
            rows.append(prompt)
            positions = [len(prompt) - 1] * len(target)
        for pos, tok in zip(positions, target):
            tgt_rows.append(row)
            tgt_pos.append(pos)
            tgt_ids.append(tok)
            tgt_req.append(r)
    width = max(len(x) for x in rows)
    pad = lm.pad_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1

    def t(values):
        return torch.tensor(values, dtype=torch.long, device=lm.device)

    return ids.to(lm.device), mask.to(lm.device), t(tgt_rows), t(tgt_pos), t(tgt_ids), t(tgt_req)


class FineTuneEditor(PresetHparams, Capabilities):
    """Adam on the out-projection weights of ``layers``; every weight stays within eps of its original.

    The trainable parameter is a float32 delta added through a forward hook (output + x Delta^T), which
    is the same optimisation as tuning W itself but never touches the model's weights (so they are
    unchanged on return, raise or cancel) and stays float32 for half-precision models. After each step
    the delta is clamped into [-eps, eps], i.e. W into [W0 - eps, W0 + eps].
    """

    name = "ft"
    title = "FT"
    layers_key = "layers"
    request_free = False
    convergence_advice = "more steps, a larger lr, a larger norm_constraint, or other layers"

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
        steps, eps = int(hp["steps"]), float(hp["norm_constraint"])
        ids, mask, tgt_rows, tgt_pos, tgt_ids, tgt_req = _rows(lm, requests, str(hp["objective"]))
        erase = torch.tensor([r.mode == "erase" for r in requests], device=lm.device)[tgt_req]
        deltas = {
            layer: torch.zeros(
                (lm.d_model, lm.d_mlp), dtype=torch.float32, device=lm.device, requires_grad=True
            )
            for layer in layers
        }
        opt = torch.optim.Adam(list(deltas.values()), lr=float(hp["lr"]))

        def make_hook(layer: int):
            def hook(_module, inputs, output):
                return output + F.linear(inputs[0].float(), deltas[layer]).to(output.dtype)

            return hook

        handles = [
            lm.module(lm.spec.mlp_out_path(layer)).register_forward_hook(make_hook(layer)) for layer in layers
        ]
        losses: list[float] = []
        try:
            for step in range(steps):
                check_cancel(ctx.cancel)
                logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                logp = logits[tgt_rows, tgt_pos].float().log_softmax(-1).gather(1, tgt_ids[:, None])[:, 0]
                unlikely = -torch.log((-torch.expm1(logp)).clamp_min(1e-12))
                per_tok = torch.where(erase, unlikely, -logp)
                n = len(requests)
                per_req = torch.zeros(n, device=lm.device).index_add(0, tgt_req, per_tok) / torch.zeros(
                    n, device=lm.device
                ).index_add(0, tgt_req, torch.ones_like(per_tok))
                loss = per_req.mean()
                value = float(loss.detach())
                losses.append(value)
                ctx.emit(Progress("ft", step + 1, steps, f"loss {value:.4f}"))
                if value < STOP_LOSS:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for delta in deltas.values():
                        delta.clamp_(-eps, eps)
        finally:
            for h in handles:
                h.remove()
        out = {
            weight_name(lm, layer): to_param_layout(delta.detach(), lm.spec).cpu()
            for layer, delta in deltas.items()
        }
        return EditDelta(
            deltas=out,
            method=self.name,
            model_name=lm.name,
            layers=layers,
            hparams=dict(hp),
            requests=[r.to_dict() for r in requests],
            # The loss is one mean over every request: each request's final loss is that mean.
            info={
                "loss": losses,
                "request_loss": [losses[-1] if losses else None] * len(requests),
                "request_steps": [len(losses)] * len(requests),
            },
        )
