"""DINM (Wang et al. 2024): locate each request's toxic layer, then tune only its MLP out-projection."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

from detox_tui.backends.chat import format_prompt, prompt_ids, uses_chat_template
from detox_tui.backends.editing.base import Capabilities, EditContext, EditDelta, EditRequest
from detox_tui.backends.editing.presets import PresetHparams
from detox_tui.errors import UserError
from detox_tui.events import Progress, check_cancel

log = logging.getLogger(__name__)


def builtin_neutral_prompts() -> list[str]:
    text = resources.files("detox_tui.data").joinpath("neutral_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _param_name(lm: Any, layer: int) -> str:
    return f"{lm.spec.mlp_out_path(layer)}.weight"


@contextmanager
def _out_projection_deltas(lm: Any, deltas: Mapping[int, Callable[[], torch.Tensor]]) -> Iterator[None]:
    """Add ``x @ delta`` to each listed layer's out-projection output, so the weights stay untouched.

    ``deltas[layer]()`` returns the current delta in the parameter's own layout; adding ``x @ D`` (Conv1D,
    (in, out)) or ``x @ D.T`` (Linear, (out, in)) equals running with weight ``W + D``. Gradients reach
    the delta, never the weights.
    """
    conv1d = lm.spec.conv1d
    handles = []

    def make_hook(get_delta: Callable[[], torch.Tensor]) -> Callable:
        def hook(_module, inputs, output):
            x = inputs[0]
            d = get_delta()
            extra = x.to(d.dtype) @ (d if conv1d else d.T)
            return output + extra.to(output.dtype)

        return hook

    try:
        for layer, get_delta in deltas.items():
            module = lm.module(lm.spec.mlp_out_path(layer))
            handles.append(module.register_forward_hook(make_hook(get_delta)))
        yield
    finally:
        for h in handles:
            h.remove()


def _encode_pair(lm: Any, prompt: str, response: str) -> tuple[torch.Tensor, int]:
    """Token ids of prompt + response (tokenised separately so the boundary is exact) and the prompt length.

    The prompt is what the model sees before it answers: wrapped in the chat template when the run uses one.
    """
    tok = lm.tokenizer
    p_ids = prompt_ids(lm, prompt)
    r_ids = list(tok(response, add_special_tokens=False)["input_ids"])
    if not r_ids:
        raise UserError(f"The response '{response}' for the prompt '{prompt}' tokenises to nothing.")
    return torch.tensor([p_ids + r_ids], device=lm.device), len(p_ids)


def _block_outputs(lm: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output for one sequence ([seq, d_model] per layer), recorded with hooks.

    Hooks rather than ``output_hidden_states`` because HF applies the final norm to the last entry.
    """
    outs: list[torch.Tensor | None] = [None] * lm.n_layers
    handles = []

    def recorder(layer: int) -> Callable:
        def hook(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            outs[layer] = h[0].detach().float()

        return hook

    try:
        for layer in range(lm.n_layers):
            handles.append(lm.module(lm.spec.block_path(layer)).register_forward_hook(recorder(layer)))
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return [o for o in outs if o is not None]


def locate_toxic_layer(lm: Any, prompt: str, safe: str, unsafe: str) -> tuple[int, list[float]]:
    """The block whose output differs most (L2) between prompt + safe and prompt + unsafe response.

    Responses differ in length, so positions are not aligned; each block output is mean-pooled over the
    response's own tokens (in the context of the prompt) before taking the L2 distance. Returns the
    layer and the distance at every layer.
    """
    safe_ids, n_prompt = _encode_pair(lm, prompt, safe)
    unsafe_ids, _ = _encode_pair(lm, prompt, unsafe)
    safe_h = _block_outputs(lm, safe_ids)
    unsafe_h = _block_outputs(lm, unsafe_ids)
    distances = [
        float(torch.linalg.vector_norm(s[n_prompt:].mean(0) - u[n_prompt:].mean(0)))
        for s, u in zip(safe_h, unsafe_h, strict=True)
    ]
    layer = max(range(len(distances)), key=lambda i: distances[i])
    return layer, distances


def _neutral_batch(lm: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    # General prompts are sent the way the edited prompts are: as user turns when the run uses a chat template.
    texts = [format_prompt(lm, p) for p in prompts]
    enc = lm.tokenizer(
        texts, return_tensors="pt", padding=True, add_special_tokens=not uses_chat_template(lm)
    )
    mask = enc["attention_mask"].to(lm.device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": enc["input_ids"].to(lm.device), "attention_mask": mask, "position_ids": positions}


def _log_probs(lm: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.log_softmax(lm.model(**batch).logits.float(), dim=-1)


class DinmEditor(PresetHparams, Capabilities):
    """Detoxifying with Knowledge Editing: per request, locate the toxic layer and tune its out-projection.

    Requests are edited sequentially: each is located and tuned on the original weights plus the
    previous requests' deltas, and the layer located for one request never carries over to the next.
    Tuning runs through a forward hook that adds a trainable delta to the out-projection's output, so
    the model's weights are never modified while computing (they are unchanged on return, raise or
    cancel). Loss = nll_weight x NLL(safe target | prompt) + kl_weight x KL(p_original || p_edited) of the
    next-token distributions on general (neutral) prompts.
    """

    name = "dinm"
    title = "DINM"
    # The layer is located per request unless one is given: then exactly one.
    layers_key = "layer"
    single_layer = True
    layers_optional = True
    locates_layer = True
    request_free = False
    optional_hparams = {"layer": None}
    convergence_advice = "more steps, a larger lr or nll_weight, or a smaller kl_weight"

    def compute(
        self,
        lm: Any,
        requests: Sequence[EditRequest],
        hparams: Mapping[str, Any],
        ctx: EditContext,
    ) -> EditDelta:
        hp = self.resolve_hparams(lm, hparams)
        steps, lr = int(hp["steps"]), float(hp["lr"])
        nll_weight, kl_weight = float(hp["nll_weight"]), float(hp["kl_weight"])
        forced = hp.get("layer")
        if forced is not None:
            forced = lm.check_layers([forced])[0]
        if not requests:
            raise UserError("DINM needs at least one edit request.")
        for req in requests:
            if not req.toxic:
                raise UserError(
                    f"DINM needs an unsafe response to locate the toxic layer for the prompt '{req.prompt}'; "
                    "run a baseline first or give the request a toxic continuation."
                )
            if not req.target:
                raise UserError(f"DINM needs a safe target response for the prompt '{req.prompt}'.")
        general = list(ctx.neutral_prompts) if ctx.neutral_prompts else builtin_neutral_prompts()
        if not general:
            raise UserError("DINM needs at least one general (neutral) prompt for its KL term.")

        emit = ctx.emit
        neutral = _neutral_batch(lm, general)
        token_mask = neutral["attention_mask"].bool()
        with torch.no_grad():
            reference = _log_probs(lm, neutral)  # the original model's distributions, before any request

        accumulated: dict[int, torch.Tensor] = {}
        located: list[int] = []
        distances: list[list[float]] = []
        losses: list[list[float]] = []
        total = steps * len(requests)
        emit(Progress("dinm", 0, total, f"DINM on {len(requests)} request(s)"))
        for r_index, req in enumerate(requests):
            check_cancel(ctx.cancel)
            previous = {layer: (lambda d=d: d) for layer, d in accumulated.items()}
            with _out_projection_deltas(lm, previous):
                if forced is None:
                    layer, dist = locate_toxic_layer(lm, req.prompt, req.target, req.toxic)
                else:
                    layer, dist = forced, []
            located.append(layer)
            distances.append(dist)
            log.info("DINM request %d: toxic layer %d", r_index, layer)

            weight = lm.module(lm.spec.mlp_out_path(layer)).weight
            base = accumulated.get(layer, torch.zeros(weight.shape, device=lm.device, dtype=torch.float32))
            trainable = torch.zeros_like(base, requires_grad=True)
            active = {l_: (lambda d=d: d) for l_, d in accumulated.items() if l_ != layer}
            active[layer] = lambda base=base, trainable=trainable: base + trainable
            ids, n_prompt = _encode_pair(lm, req.prompt, req.target)
            labels = ids[:, n_prompt:]
            opt = torch.optim.Adam([trainable], lr=lr)
            curve: list[float] = []
            with _out_projection_deltas(lm, active):
                for step in range(steps):
                    check_cancel(ctx.cancel)
                    logits = lm.model(input_ids=ids).logits[:, n_prompt - 1 : -1].float()
                    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
                    current = _log_probs(lm, neutral)
                    kl_tok = (reference.exp() * (reference - current)).sum(-1)
                    kl = kl_tok[token_mask].mean()
                    loss = nll_weight * nll + kl_weight * kl
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    curve.append(float(loss.detach()))
                    emit(Progress("dinm", r_index * steps + step + 1, total))
            accumulated[layer] = (base + trainable.detach()).detach()
            losses.append(curve)

        deltas = {_param_name(lm, layer): d.to(torch.float32).cpu() for layer, d in accumulated.items()}
        return EditDelta(
            deltas=deltas,
            method=self.name,
            model_name=lm.name,
            layers=sorted(accumulated),
            hparams=dict(hp),
            requests=[r.to_dict() for r in requests],
            info={
                "located_layers": located,
                "loss": [c[-1] if c else None for c in losses],
                "request_loss": [c[-1] if c else None for c in losses],
                "request_steps": [len(c) for c in losses],
                "loss_history": losses,
                "layer_distances": distances,
                "forced_layer": forced is not None,
            },
        )
