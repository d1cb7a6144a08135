"""The Scorer protocol: score(texts) -> {attribute: array of probabilities in [0, 1]}."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Scorer(Protocol):
    """A batched toxicity scorer.

    ``attributes`` lists every attribute ``score`` returns (Detoxify: toxicity, severe_toxicity, ...);
    ``primary`` is the one tables lead with (always "toxicity" for the builtin scorers).
    """

    name: str
    attributes: tuple[str, ...]
    primary: str

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]: ...
