"""Toxicity scorers behind one protocol: detoxify, any HF text classifier, offline profanity."""

from detox_tui.backends.scorers.base import Scorer
from detox_tui.backends.scorers.registry import SCORER_CHOICES, load_scorer

__all__ = ["SCORER_CHOICES", "Scorer", "load_scorer"]
