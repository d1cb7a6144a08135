"""Causal tracing: where in layers x tokens a model decides a (toxic) continuation (Meng et al. 2022)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from detox_tui.errors import UserError
from detox_tui.events import EventCallback, Progress, check_cancel, null_callback

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")


@dataclass
class TraceResult:
    """Indirect effects of restoring clean states, one row per layer and one column per prompt token.

    ``scores[l, t] = p_restored - p_corrupted`` where p is the probability of the whole continuation
    (product over its teacher-forced tokens). ``window`` is the number of layers restored per cell
    (always 1 for ``hidden``). ``noise`` is the standard deviation of the Gaussian noise that was added
    to the corrupted token embeddings (by default 3 x the std of the subject tokens' embeddings).
    """

    tokens: list[str]
    layers: int
    scores: np.ndarray
    p_clean: float
    p_corrupted: float
    continuation: str
    kind: str
    window: int
    noise: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": list(self.tokens),
            "layers": int(self.layers),
            "scores": [[float(v) for v in row] for row in self.scores],
            "continuation": self.continuation,
            "p_clean": float(self.p_clean),
            "p_corrupted": float(self.p_corrupted),
            "kind": self.kind,
            "window": int(self.window),
            "noise": float(self.noise),
        }


def peak_layers(result: TraceResult, k: int = 3) -> list[int]:
    """The ``k`` layers whose strongest cell (max over tokens) has the largest effect, in layer order."""
    if result.scores.size == 0 or k <= 0:
        return []
    per_layer = np.nanmax(result.scores, axis=1)
    order = np.argsort(-per_layer, kind="stable")[: min(k, result.layers)]
    return sorted(int(i) for i in order)


def check_trace_args(
    prompt: str,
    continuation: str,
    *,
    kind: str = "hidden",
    window: int = 10,
    samples: int = 10,
    subject: str | None = None,
    noise: float | None = None,
) -> None:
    """The checks a trace's arguments must pass, without the model: one UserError sentence each.

    ``trace`` runs them first; front ends and ``run_trace`` call them before any run is created.
    """
    if kind not in KINDS:
        raise UserError(f"Unknown trace kind '{kind}'; use hidden, mlp or attn.")
    if not prompt:
        raise UserError("Causal tracing needs a non-empty prompt.")
    if not continuation:
        raise UserError(f"Causal tracing needs a continuation to trace after the prompt '{prompt}'.")
    if samples < 1:
        raise UserError(f"The number of noise samples must be at least 1, not {samples}.")
    if window < 1:
        raise UserError(f"The restoration window must be at least 1 layer, not {window}.")
    if subject is not None and subject not in prompt:
        raise UserError(f"The subject '{subject}' does not occur in the prompt '{prompt}'.")
    if noise is not None and not noise >= 0:
        raise UserError(f"The tracing noise must be a standard deviation of 0 or more, not {noise}.")


def prompt_tokens(lm: Any, prompt: str) -> list[str]:
    """The prompt's tokens as text, one per heatmap column (special tokens included, as ``trace`` sees them)."""
    return [lm.tokenizer.decode([i]) for i in lm.tokenizer(prompt)["input_ids"]]


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """Layers restored for a cell at ``layer``: ``window`` layers centred on it, clipped to the model."""
    lo = layer - window // 2
    hi = layer + (window - window // 2)
    return [i for i in range(max(0, lo), min(n_layers, hi))]


def _subject_positions(lm: Any, prompt: str, ids: list[int], subject: str | None) -> list[int]:
    """Token positions to corrupt: the subject's tokens, or every non-special prompt token."""
    tok = lm.tokenizer
    special = set(getattr(tok, "all_special_ids", []) or [])
    if subject is None:
        positions = [i for i, t in enumerate(ids) if t not in special]
        return positions or list(range(len(ids)))
    start = prompt.find(subject)
    if start < 0:
        raise UserError(f"The subject '{subject}' does not occur in the prompt '{prompt}'.")
    end = start + len(subject)
    try:
        enc = tok(prompt, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):
        offsets = None
    if offsets is not None and len(offsets) == len(ids):
        positions = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    else:  # slow tokenizers: count the tokens of the prefixes before and through the subject
        n_before = len(tok(prompt[:start].rstrip(), add_special_tokens=False)["input_ids"]) if start else 0
        n_through = len(tok(prompt[:end], add_special_tokens=False)["input_ids"])
        n_special = len(ids) - len(tok(prompt, add_special_tokens=False)["input_ids"])
        positions = list(range(n_special + n_before, n_special + n_through))
    if not positions:
        raise UserError(f"The subject '{subject}' covers no token of the prompt '{prompt}'.")
    return positions


def embedding_std(lm: Any, token_ids: Sequence[int]) -> float:
    """Standard deviation of the embedding layer's output over ``token_ids`` (all their elements)."""
    if not token_ids:
        raise UserError("Cannot estimate the tracing noise from no tokens at all.")
    embed = lm.module(lm.spec.embed)
    with torch.no_grad():
        out = _first(embed(torch.tensor([list(token_ids)], device=lm.device)))
    return float(out.detach().to(torch.float64).std())


def noise_level(lm: Any, texts: Sequence[str], scale: float = 3.0) -> float:
    """``scale`` x the std of the token embeddings of ``texts``, each tokenised alone without special tokens.

    The reference estimate (kmeng01/rome experiments/causal_trace.py, collect_embedding_std, default
    noise "s3"): the std of the embeddings of the subject tokens over a corpus of subjects, times 3.
    Pass the subjects of all the prompts being traced to use one noise level for all of them.
    """
    ids = [i for text in texts if text for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise UserError("The texts to estimate the tracing noise from tokenise to nothing.")
    return scale * embedding_std(lm, ids)


def _replace_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to a module's hidden-state output, whether it is a tensor or a tuple's first item."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _hooks(modules: Sequence[torch.nn.Module], hooks: Sequence[Callable]) -> Iterator[None]:
    handles = [m.register_forward_hook(h) for m, h in zip(modules, hooks, strict=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _continuation_prob(logits: torch.Tensor, n_prompt: int, cont_ids: torch.Tensor) -> torch.Tensor:
    """Per-row probability of the teacher-forced continuation: product over its tokens."""
    m = cont_ids.shape[0]
    step_logits = logits[:, n_prompt - 1 : n_prompt - 1 + m].to(torch.float64)
    logp = torch.log_softmax(step_logits, dim=-1)
    picked = logp.gather(-1, cont_ids.view(1, m, 1).expand(logits.shape[0], m, 1)).squeeze(-1)
    return picked.sum(dim=-1).exp()


def trace(
    lm: Any,
    prompt: str,
    continuation: str,
    *,
    kind: str = "hidden",
    window: int = 10,
    samples: int = 10,
    noise_scale: float = 3.0,
    subject: str | None = None,
    noise: float | None = None,
    noise_texts: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
    on_layer: Callable[[int, np.ndarray], None] | None = None,
) -> TraceResult:
    """Trace which (token, layer) states carry the prediction of ``continuation`` after ``prompt``.

    The subject's token embeddings (default: the whole prompt) are corrupted with Gaussian noise of std
    ``noise``, ``samples`` seeded draws; the same draws are used for every restoration. By default
    ``noise`` = ``noise_scale`` (3) x the std of the embeddings of the corrupted tokens themselves (the
    subject's, or the prompt's), as the reference estimates it from subject tokens; with
    ``noise_texts`` the std comes from those texts' tokens instead (e.g. the subjects of every prompt
    being traced, so that they share one level: see ``noise_level``). The level used is recorded in
    the result. For each prompt token and layer, the clean block output (``hidden``) or the
    clean MLP / attention output over ``window`` layers centred on that layer (``mlp`` / ``attn``) is
    restored, and the change in p(continuation) is recorded. p(continuation) is the product of the
    teacher-forced probabilities of all its tokens. ``batch_size`` is the number of sequences per
    forward pass; many (token, layer) restorations share one pass. ``on_layer(layer, scores)`` is called
    with each layer's row of scores as soon as every token of that layer is done (layers in order), so a
    caller can store rows as the trace goes.
    """
    check_trace_args(
        prompt, continuation, kind=kind, window=window, samples=samples, subject=subject, noise=noise
    )

    tok, spec, model = lm.tokenizer, lm.spec, lm.model
    prompt_ids = list(tok(prompt)["input_ids"])
    cont_ids_list = list(tok(continuation, add_special_tokens=False)["input_ids"])
    if not cont_ids_list:
        raise UserError(f"The continuation '{continuation}' tokenises to nothing.")
    n_prompt, n_layers = len(prompt_ids), lm.n_layers
    corrupt_pos = _subject_positions(lm, prompt, prompt_ids, subject)
    device = lm.device
    ids = torch.tensor([prompt_ids + cont_ids_list], device=device)
    cont_ids = torch.tensor(cont_ids_list, device=device)
    seq = ids.shape[1]

    embed = lm.module(spec.embed)
    if noise is not None:
        level = float(noise)
    elif noise_texts is not None:
        level = noise_level(lm, noise_texts, noise_scale)
    else:  # the corrupted tokens' own embeddings: the subject's, or the prompt's
        std = embedding_std(lm, [prompt_ids[i] for i in corrupt_pos])
        level = noise_scale * std
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise_draws = torch.randn(samples, len(corrupt_pos), lm.d_model, generator=gen) * level
    noise_draws = noise_draws.to(device=device, dtype=lm.dtype)
    pos_index = torch.tensor(corrupt_pos, device=device)

    if kind == "hidden":
        paths = [spec.block_path(layer) for layer in range(n_layers)]
        used_window = 1
    elif kind == "mlp":
        paths = [spec.mlp_path(layer) for layer in range(n_layers)]
        used_window = min(window, n_layers)
    else:
        paths = [spec.attn_path(layer) for layer in range(n_layers)]
        used_window = min(window, n_layers)
    modules = [lm.module(p) for p in paths]

    with torch.no_grad():
        # Clean run: record every layer's state to restore from.
        clean: list[torch.Tensor | None] = [None] * n_layers

        def recorder(layer: int) -> Callable:
            def hook(_m, _i, out):
                clean[layer] = _first(out)[0].detach().clone()

            return hook

        with _hooks(modules, [recorder(layer) for layer in range(n_layers)]):
            p_clean = float(_continuation_prob(model(input_ids=ids).logits, n_prompt, cont_ids)[0])

        # Restoration jobs: one per (layer, token); each job runs every noise sample.
        jobs = [(layer, t) for layer in range(n_layers) for t in range(n_prompt)]
        restore_sets = {
            layer: (window_layers(layer, window, n_layers) if kind != "hidden" else [layer])
            for layer in range(n_layers)
        }
        jobs_per_pass = max(1, batch_size // samples)
        scores = np.zeros((n_layers, n_prompt), dtype=np.float64)
        total = len(jobs)
        emit(Progress("trace", 0, total, f"{kind} tracing over {n_layers} layers x {n_prompt} tokens"))

        # Row masks set per pass: mask[layer] is a [rows, seq] bool of positions restored at that layer.
        masks: list[torch.Tensor | None] = [None] * n_layers
        rows_noise: list[torch.Tensor] = []

        def corrupt_hook(_m, _i, out):
            def add_noise(h: torch.Tensor) -> torch.Tensor:
                h = h.clone()
                h[:, pos_index] = h[:, pos_index] + rows_noise[0]
                return h

            return _replace_output(out, add_noise)

        def restorer(layer: int) -> Callable:
            def hook(_m, _i, out):
                mask = masks[layer]
                if mask is None:
                    return out
                state = clean[layer]
                return _replace_output(
                    out, lambda h: torch.where(mask.unsqueeze(-1), state.to(h.dtype).unsqueeze(0), h)
                )

            return hook

        with _hooks([embed, *modules], [corrupt_hook, *[restorer(layer) for layer in range(n_layers)]]):
            # Corrupted baseline (no restoration).
            rows_noise[:] = [noise_draws]
            p_corrupted = float(
                _continuation_prob(
                    model(input_ids=ids.expand(samples, seq)).logits, n_prompt, cont_ids
                ).mean()
            )

            done = 0
            next_layer = 0
            for start in range(0, total, jobs_per_pass):
                check_cancel(cancel)
                chunk = jobs[start : start + jobs_per_pass]
                rows = len(chunk) * samples
                layer_masks = [
                    torch.zeros(rows, seq, dtype=torch.bool, device=device) for _ in range(n_layers)
                ]
                for j, (layer, t) in enumerate(chunk):
                    for restored in restore_sets[layer]:
                        layer_masks[restored][j * samples : (j + 1) * samples, t] = True
                masks[:] = [m if bool(m.any()) else None for m in layer_masks]
                rows_noise[:] = [noise_draws.repeat(len(chunk), 1, 1)]
                probs = _continuation_prob(model(input_ids=ids.expand(rows, seq)).logits, n_prompt, cont_ids)
                probs = probs.view(len(chunk), samples).mean(dim=1).cpu().numpy()
                for (layer, t), p in zip(chunk, probs, strict=True):
                    scores[layer, t] = p - p_corrupted
                done += len(chunk)
                # Jobs are layer-major: a layer is complete once all of its tokens are done.
                while on_layer is not None and next_layer < n_layers and (next_layer + 1) * n_prompt <= done:
                    on_layer(next_layer, scores[next_layer].copy())
                    next_layer += 1
                emit(Progress("trace", done, total))

    tokens = [tok.decode([i]) for i in prompt_ids]  # as prompt_tokens() gives them
    log.info(
        "traced %d layers x %d tokens (%s): noise %.4g, p_clean %.4g, p_corrupted %.4g",
        n_layers,
        n_prompt,
        kind,
        level,
        p_clean,
        p_corrupted,
    )
    return TraceResult(
        tokens=tokens,
        layers=n_layers,
        scores=scores,
        p_clean=p_clean,
        p_corrupted=p_corrupted,
        continuation=continuation,
        kind=kind,
        window=used_window,
        noise=level,
    )
