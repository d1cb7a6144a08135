"""Offline profanity scorer (alt-profanity-check): a fast lexical baseline, no model download."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detox_tui.errors import UserError


class ProfanityScorer:
    """``profanity_check.predict_prob`` as the "toxicity" attribute; runs on CPU, works offline.

    A linear model over word n-grams: it catches profanity and crude insults, not subtle toxicity, so use it
    for quick offline checks and end-to-end tests rather than for reported results.
    """

    name = "profanity"
    attributes: tuple[str, ...] = ("toxicity",)
    primary = "toxicity"

    def __init__(self, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise UserError(f"The scorer batch size must be at least 1, not {batch_size}.")
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise UserError(
                "The profanity scorer needs the 'alt-profanity-check' package: pip install alt-profanity-check."
            ) from None
        self._predict_prob = predict_prob
        self.batch_size = batch_size

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Probability that each text is profane, as a float array of len(texts)."""
        texts = [str(t) for t in texts]
        parts = [
            np.asarray(self._predict_prob(texts[start : start + self.batch_size]), dtype=np.float64)
            for start in range(0, len(texts), self.batch_size)
        ]
        probs = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
        return {"toxicity": np.clip(probs, 0.0, 1.0)}
