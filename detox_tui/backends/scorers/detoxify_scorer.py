"""Detoxify scorer: every attribute the Detoxify checkpoint predicts, sigmoid probabilities, batched."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from detox_tui.errors import UserError

log = logging.getLogger(__name__)

DETOXIFY_VARIANTS = ("original", "unbiased", "multilingual", "original-small", "unbiased-small")
_LOCAL_HINT = "pass a local checkpoint with --scorer detoxify:/path/to/file.ckpt[@/path/to/hf_config_dir]"


def cached_checkpoint_path(variant: str) -> Path:
    """Where torch.hub keeps (or would keep) the downloaded weights of a Detoxify ``variant``."""
    from detoxify.detoxify import MODEL_URLS

    name = os.path.basename(urlparse(MODEL_URLS[variant]).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


class DetoxifyScorer:
    """Wraps ``detoxify.Detoxify``; ``attributes`` are the checkpoint's class names (toxicity first).

    ``checkpoint`` loads a local Detoxify checkpoint instead of the hub weights; ``huggingface_config_path``
    is a directory with the model's HF config and tokenizer, for fully offline loading.
    """

    primary = "toxicity"

    def __init__(
        self,
        variant: str = "unbiased",
        device: str | torch.device = "cpu",
        checkpoint: str | os.PathLike[str] | None = None,
        huggingface_config_path: str | os.PathLike[str] | None = None,
        batch_size: int = 32,
        max_length: int = 512,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"The scorer batch size must be at least 1, not {batch_size}.")
        if checkpoint is None and variant not in DETOXIFY_VARIANTS:
            raise UserError(
                f"Unknown Detoxify variant '{variant}'; choose one of {', '.join(DETOXIFY_VARIANTS)}."
            )
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise UserError(f"Detoxify checkpoint '{checkpoint}' does not exist.")
        if huggingface_config_path is not None and not Path(huggingface_config_path).is_dir():
            raise UserError(f"Detoxify config directory '{huggingface_config_path}' does not exist.")
        self.variant = variant
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = f"detoxify:{checkpoint}" if checkpoint is not None else f"detoxify:{variant}"
        self._detoxify = self._load(variant, checkpoint, huggingface_config_path)
        self.model = self._detoxify.model.eval()
        self.tokenizer = self._detoxify.tokenizer
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", max_length)]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 10**6:
            limits.append(tok_max)
        if getattr(self.model.config, "model_type", "") in ("roberta", "xlm-roberta"):
            limits[1] -= 2  # RoBERTa position ids start after the padding index
        self.max_length = min(limits)
        names = list(self._detoxify.class_names)
        if self.primary not in names:
            raise UserError(
                f"Detoxify checkpoint '{self.name}' has no 'toxicity' class (it has {', '.join(names)})."
            )
        self._order = [names.index(self.primary)] + [i for i, n in enumerate(names) if n != self.primary]
        self.attributes: tuple[str, ...] = tuple(names[i] for i in self._order)

    def _load(self, variant: str, checkpoint, config_path):
        from detoxify import Detoxify

        try:
            return Detoxify(
                model_type=variant,
                checkpoint=None if checkpoint is None else str(checkpoint),
                device=self.device,
                huggingface_config_path=None if config_path is None else str(config_path),
            )
        except UserError:
            raise
        except Exception as exc:  # torch.hub / transformers raise many types when offline
            log.debug("Detoxify load failed", exc_info=True)
            if checkpoint is None and not cached_checkpoint_path(variant).is_file():
                raise UserError(
                    f"Detoxify '{variant}' weights are not cached in {cached_checkpoint_path(variant).parent} "
                    f"and could not be downloaded ({type(exc).__name__}); connect once to download them, "
                    f"or {_LOCAL_HINT}."
                ) from None
            if checkpoint is not None and isinstance(exc, (ValueError, KeyError, TypeError)):
                raise UserError(
                    f"Detoxify checkpoint '{checkpoint}' is not a valid Detoxify checkpoint ({exc})."
                ) from None
            raise UserError(
                f"Detoxify could not load the Hugging Face config/tokenizer for '{self.name}' "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); connect once so they "
                f"are cached, or {_LOCAL_HINT}."
            ) from None

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Sigmoid probability of every attribute for each text, as float arrays of len(texts)."""
        texts = list(texts)
        chunks: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                enc = self.tokenizer(
                    batch, return_tensors="pt", truncation=True, padding=True, max_length=self.max_length
                ).to(self.model.device)
                logits = self.model(**enc)[0]
                chunks.append(torch.sigmoid(logits.float()).cpu())
        if not chunks:
            return {name: np.zeros(0, dtype=np.float64) for name in self.attributes}
        probs = torch.cat(chunks).numpy().astype(np.float64)
        return {name: probs[:, col] for name, col in zip(self.attributes, self._order)}
