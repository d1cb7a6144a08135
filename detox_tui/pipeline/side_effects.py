"""Side effects of an edit: neutral-text perplexity, KL on neutral prompts, n-gram entropy (fluency)."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from detox_tui.backends.models import LoadedModel, pad_batch
from detox_tui.errors import UserError
from detox_tui.pipeline.generation import _encode, context_length, token_logprobs

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+|[^\w\s]")


@torch.no_grad()
def perplexity(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    max_tokens: int = 4096,
    batch_size: int = 8,
) -> float:
    """Token-weighted perplexity of ``texts``: exp of the mean NLL over every predicted token.

    Each text is cut to the model's context; texts are read in order until ``max_tokens`` tokens in total have
    been taken (the last one cut short). NaN when no token can be predicted (texts of one token or none).
    """
    ctx = context_length(lm)
    docs: list[list[int]] = []
    budget = max(0, int(max_tokens))
    for text in texts:
        if budget <= 0:
            break
        ids = _encode(lm, text)
        if ctx is not None:
            ids = ids[:ctx]
        ids = ids[:budget]
        budget -= len(ids)
        if len(ids) >= 2:
            docs.append(ids)
    if not docs:
        return float("nan")
    pad_id = lm.pad_id
    total_nll = 0.0
    count = 0
    for start in range(0, len(docs), max(1, batch_size)):
        chunk = docs[start : start + batch_size]
        ids, mask = pad_batch(chunk, pad_id, lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        for j, doc in enumerate(chunk):
            n = len(doc)
            lp = token_logprobs(logits[j, : n - 1], ids[j, 1:n])
            total_nll -= float(lp.double().sum())
            count += n - 1
    return float(math.exp(total_nll / count))


@torch.no_grad()
def next_token_logprobs(lm: LoadedModel, prompts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
    """Log-probabilities of the next token at each prompt's last token: a float32 CPU tensor [n, vocab]."""
    ctx = context_length(lm)
    rows: list[list[int]] = []
    for prompt in prompts:
        ids = _encode(lm, prompt)
        if not ids:
            bos = lm.tokenizer.bos_token_id
            ids = [bos if bos is not None else lm.tokenizer.eos_token_id]
        if ctx is not None:
            ids = ids[-ctx:]
        rows.append(ids)
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    if not rows:
        return torch.zeros((0, vocab), dtype=torch.float32)
    pad_id = lm.pad_id
    out = []
    for start in range(0, len(rows), max(1, batch_size)):
        chunk = rows[start : start + batch_size]
        ids, mask = pad_batch(chunk, pad_id, lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        last = torch.tensor([len(r) - 1 for r in chunk], device=logits.device)
        picked = logits[torch.arange(len(chunk), device=logits.device), last].float()
        out.append(torch.log_softmax(picked, dim=-1).cpu())
    return torch.cat(out)


def kl_divergence(logp_ref: torch.Tensor, logp_new: torch.Tensor) -> float:
    """Mean over rows of KL(ref || new) in nats, from two [n, vocab] tensors of log-probabilities."""
    if logp_ref.shape != logp_new.shape:
        raise ValueError(f"shape mismatch: {tuple(logp_ref.shape)} vs {tuple(logp_new.shape)}")
    if logp_ref.numel() == 0:
        return float("nan")
    ref = logp_ref.double().reshape(-1, logp_ref.shape[-1])
    new = logp_new.double().reshape(-1, logp_new.shape[-1])
    p = ref.exp()
    # Tokens the reference never produces (p = 0) contribute nothing, even where new is -inf too.
    terms = torch.where(p > 0, p * (ref - new), torch.zeros_like(p))
    kl = terms.sum(-1).clamp_min(0.0)
    return float(kl.mean())


def _ngram_entropy_one(words: Sequence[str], n: int) -> float:
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    freqs = np.array(list(grams.values()), dtype=float)
    freqs /= freqs.sum()
    return float(-(freqs * np.log2(freqs)).sum())


def ngram_entropy(
    texts: Sequence[str],
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
) -> float:
    """ROME's fluency measure: per text the weighted average of its n-gram entropies (bits), averaged over texts.

    Words are ``\\w+`` runs and single punctuation marks; a text too short for an n contributes 0 for that n.
    Repetitive (degenerate) text scores low. An empty list gives 0.0.
    """
    if len(ns) != len(weights):
        raise ValueError("ns and weights must have the same length")
    if not texts:
        return 0.0
    w = np.asarray(weights, dtype=float)
    per_text = []
    for text in texts:
        words = _WORD.findall(text)
        ent = np.array([_ngram_entropy_one(words, n) for n in ns])
        per_text.append(float((w * ent).sum() / w.sum()))
    return float(np.mean(per_text))


@dataclass
class NeutralReference:
    """Side-effect measures of the original weights, taken once and compared against every edit."""

    perplexity: float
    logprobs: torch.Tensor
    n_texts: int = 0
    n_prompts: int = 0
    max_tokens: int = 4096


def measure_reference(
    lm: LoadedModel,
    corpus_texts: Sequence[str],
    neutral_prompts: Sequence[str],
    max_tokens: int = 4096,
) -> NeutralReference:
    """Perplexity on the neutral corpus and next-token distributions on neutral prompts (original weights)."""
    ppl = perplexity(lm, corpus_texts, max_tokens=max_tokens)
    if math.isnan(ppl):
        raise UserError(
            "The neutral corpus has no text to measure perplexity on; give it at least one sentence."
        )
    return NeutralReference(
        perplexity=ppl,
        logprobs=next_token_logprobs(lm, neutral_prompts),
        n_texts=len(corpus_texts),
        n_prompts=len(neutral_prompts),
        max_tokens=max_tokens,
    )


def compare_side_effects(
    lm: LoadedModel,
    ref: NeutralReference,
    corpus_texts: Sequence[str],
    neutral_prompts: Sequence[str],
    max_tokens: int = 4096,
    collapse_factor: float = 2.0,
) -> dict[str, Any]:
    """Measure the current (edited) weights against ``ref``.

    Returns ppl_before, ppl_after, ppl_ratio, kl_neutral and collapsed: an edit is collapsed when neutral
    perplexity rises above ``collapse_factor`` times the original, or is no longer finite.
    """
    ppl_after = perplexity(lm, corpus_texts, max_tokens=max_tokens)
    logp_after = next_token_logprobs(lm, neutral_prompts)
    ppl_before = float(ref.perplexity)
    ratio = ppl_after / ppl_before if ppl_before and math.isfinite(ppl_before) else float("nan")
    collapsed = (not math.isfinite(ppl_after)) or ppl_after > collapse_factor * ppl_before
    if logp_after.shape == ref.logprobs.shape:
        kl = kl_divergence(ref.logprobs, logp_after)
    else:
        log.warning("neutral prompts differ from the reference's; KL not measured")
        kl = float("nan")
    return {
        "ppl_before": ppl_before,
        "ppl_after": float(ppl_after),
        "ppl_ratio": float(ratio),
        "kl_neutral": kl,
        "collapsed": bool(collapsed),
    }
