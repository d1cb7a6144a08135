"""Build a scorer from a spec string: detoxify[:variant|:ckpt[@config_dir]], hf:<model>[#label], profanity."""

from __future__ import annotations

import os

from detox_tui.backends.scorers.base import Scorer
from detox_tui.errors import UserError

# For help texts and the TUI's scorer picker.
SCORER_CHOICES: tuple[str, ...] = (
    "detoxify",
    "detoxify:original",
    "detoxify:unbiased",
    "detoxify:multilingual",
    "detoxify:/path/to/file.ckpt[@/path/to/config_dir]",
    "hf:<model id or path>[#<toxic label>]",
    "profanity",
)
DEFAULT_DETOXIFY_VARIANT = "unbiased"


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or "." in os.path.basename(text) or text.startswith("~")


def load_scorer(
    spec: str = "detoxify", device: str = "cpu", batch_size: int = 32, *, trust_checkpoint: bool = False
) -> Scorer:
    """Build the scorer named by ``spec`` on ``device``.

    "detoxify" (= the unbiased variant), "detoxify:original|unbiased|multilingual", "detoxify:/file.ckpt"
    or "detoxify:/file.ckpt@/config_dir" (a local Detoxify checkpoint, optionally with its HF config and
    tokenizer directory for offline loading), "hf:<model id or path>[#<toxic label>]" (any sequence
    classifier) or "profanity" (offline lexical scorer). Raises UserError for anything else.

    Detoxify checkpoints are opened without pickle; ``trust_checkpoint`` lets one that needs pickle load (with a
    warning). Hugging Face classifiers load through transformers, which never unpickles (``weights_only``).
    """
    text = (spec or "").strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if scheme == "detoxify":
        from detox_tui.backends.scorers.detoxify_scorer import DETOXIFY_VARIANTS, DetoxifyScorer

        rest = rest.strip()
        if not sep or not rest:
            return DetoxifyScorer(
                DEFAULT_DETOXIFY_VARIANT,
                device=device,
                batch_size=batch_size,
                trust_checkpoint=trust_checkpoint,
            )
        if rest.lower() in DETOXIFY_VARIANTS:
            return DetoxifyScorer(
                rest.lower(), device=device, batch_size=batch_size, trust_checkpoint=trust_checkpoint
            )
        if not _looks_like_path(rest):
            raise UserError(
                f"Unknown Detoxify variant '{rest}'; choose {', '.join(DETOXIFY_VARIANTS)} or a checkpoint path."
            )
        checkpoint, at, config_dir = rest.rpartition("@") if "@" in rest else (rest, "", "")
        return DetoxifyScorer(
            "original",
            device=device,
            checkpoint=os.path.expanduser(checkpoint),
            huggingface_config_path=os.path.expanduser(config_dir) if at and config_dir else None,
            batch_size=batch_size,
            trust_checkpoint=trust_checkpoint,
        )
    if scheme == "hf" and sep:
        from detox_tui.backends.scorers.hf_classifier import HFClassifierScorer

        model, hash_, label = rest.strip().partition("#")
        if not model.strip():
            raise UserError(f"Scorer '{text}' names no model; write hf:<model id or path>[#<toxic label>].")
        return HFClassifierScorer(
            os.path.expanduser(model.strip()),
            device=device,
            toxic_label=label.strip() if hash_ and label.strip() else None,
            batch_size=batch_size,
        )
    if scheme == "profanity" and not sep:
        from detox_tui.backends.scorers.profanity import ProfanityScorer

        return ProfanityScorer(batch_size=max(batch_size, 1))
    raise UserError(f"Unknown scorer '{text}'; choose one of: {', '.join(SCORER_CHOICES)}.")
