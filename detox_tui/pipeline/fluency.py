"""Fluency of generations: conditional perplexity under a reference model, as DExperts measures it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from detox_tui.backends.models import LoadedModel, pad_batch
from detox_tui.events import check_cancel
from detox_tui.pipeline.generation import _encode, _prompt_ids, context_length, token_logprobs

# DExperts keeps a generation's perplexity only when it is below this ("for sanity").
DEXPERTS_PPL_CAP = 1e4


@torch.no_grad()
def generation_perplexity(
    lm: LoadedModel,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    cancel=None,
    max_ppl: float | None = DEXPERTS_PPL_CAP,
    padding_side: str = "right",
) -> dict[str, Any]:
    """Conditional perplexity of each generation given its prompt under the reference model ``lm``.

    ``continuations[i]`` are the generations sampled after ``prompts[i]``. Each generation's perplexity is
    exp of the mean negative log-likelihood of *its own tokens* given the prompt (teacher forcing); the prompt's
    tokens are context only and never enter the loss. This follows ``conditional_perplexity`` in DExperts'
    scripts/evaluation/evaluate_generations.py (Liu et al. 2021), which computes, per generation,
    ``exp((full_loss - prompt_loss) / (len(full) - len(prompt)))`` - the summed loss of the tokens after the
    prompt divided by their number - keeps it when it is below 1e4 ("for sanity") and reports the
    ``np.nanmean`` over all generations of all prompts (a flat mean of per-generation perplexities, not a
    token-weighted one and not a mean of per-prompt means).

    Tokenisation (deliberate difference): DExperts encodes ``prompt + gen`` as one string, so a BPE merge across
    the seam can move a token between prompt and continuation. Here the prompt (with the tokenizer's special
    tokens, e.g. Llama's BOS) and the continuation (without special tokens) are tokenised separately and their
    ids concatenated, so the scored tokens are exactly the continuation's. An empty prompt is given BOS (or EOS)
    as context, so the continuation's first token is scored too. Input longer than the model's context is
    cut: the continuation to context - 1 tokens, then the prompt from the left.

    Batched with right padding by default (natural positions); ``padding_side="left"`` is supported too, with
    position ids from the attention mask. Empty continuations (no tokens) are skipped and counted.

    Returns ``generation_ppl`` (DExperts' aggregate: mean of the per-generation perplexities below ``max_ppl``;
    ``None`` keeps all), ``generation_ppl_median`` (median of the same kept set), ``n`` (continuations scored),
    ``n_empty``, ``n_over_cap`` (scored but at or above the cap, or NaN: left out of both aggregates), and per generation,
    aligned with ``continuations``: ``perplexities`` (NaN for an empty one) and ``token_counts`` (tokens scored).
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} lists of continuations")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    ctx = context_length(lm)
    perplexities: list[list[float]] = [[math.nan] * len(conts) for conts in continuations]
    token_counts: list[list[int]] = [[0] * len(conts) for conts in continuations]
    # (prompt index, sample index, full ids, number of continuation tokens) for every non-empty continuation.
    jobs: list[tuple[int, int, list[int], int]] = []
    n_empty = 0
    for i, (prompt, conts) in enumerate(zip(prompts, continuations)):
        for k, cont in enumerate(conts):
            c_ids = _encode(lm, cont, special=False)
            if ctx is not None:
                c_ids = c_ids[: ctx - 1]
            if not c_ids:
                n_empty += 1
                continue
            p_ids = _prompt_ids(lm, prompt, None if ctx is None else ctx - len(c_ids))
            jobs.append((i, k, p_ids + c_ids, len(c_ids)))

    pad_id = lm.pad_id
    step = max(1, int(batch_size))
    for start in range(0, len(jobs), step):
        check_cancel(cancel)
        chunk = jobs[start : start + step]
        ids, mask = pad_batch([full for *_, full, _ in chunk], pad_id, lm.device, side=padding_side)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        width = ids.shape[1]
        for j, (i, k, full, n_cont) in enumerate(chunk):
            end = len(full) if padding_side == "right" else width
            first = end - n_cont
            lp = token_logprobs(logits[j, first - 1 : end - 1], ids[j, first:end])
            nll = -float(lp.double().mean())
            perplexities[i][k] = math.exp(nll) if nll < 700.0 else math.inf
            token_counts[i][k] = n_cont
    check_cancel(cancel)

    scored = np.array([perplexities[i][k] for i, k, *_ in jobs], dtype=float)
    kept = scored if max_ppl is None else scored[scored < max_ppl]
    kept = kept[~np.isnan(kept)]
    return {
        "generation_ppl": float(kept.mean()) if kept.size else math.nan,
        "generation_ppl_median": float(np.median(kept)) if kept.size else math.nan,
        "n": len(jobs),
        "n_empty": n_empty,
        "n_over_cap": int(scored.size - (scored < max_ppl).sum()) if max_ppl is not None else 0,
        "perplexities": perplexities,
        "token_counts": token_counts,
    }
