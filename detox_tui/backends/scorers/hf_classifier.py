"""Any Hugging Face sequence classifier as a toxicity scorer (probability of its toxic label)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import numpy as np
import torch

from detox_tui.errors import UserError

log = logging.getLogger(__name__)


def _attribute_name(label: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_") or "label"


def pick_toxic_label(labels: Sequence[str], toxic_label: str | int | None = None) -> int:
    """Index of the toxic label among ``labels``.

    ``toxic_label`` may be a label name (case-insensitive) or an index (int or digit string). By default:
    the first label containing "toxic" but not "non"/"not", else index 1 (index 0 for a one-logit model).
    Raises UserError when the requested label does not exist.
    """
    shown = ", ".join(labels)
    if toxic_label is not None:
        if isinstance(toxic_label, int) or (isinstance(toxic_label, str) and toxic_label.strip().isdigit()):
            index = int(toxic_label)
            if not 0 <= index < len(labels):
                raise UserError(f"Label index {index} is out of range; the classifier's labels are: {shown}.")
            return index
        lowered = [label.lower() for label in labels]
        if toxic_label.lower() not in lowered:
            raise UserError(f"The classifier has no label '{toxic_label}'; its labels are: {shown}.")
        return lowered.index(toxic_label.lower())
    for index, label in enumerate(labels):
        name = label.lower()
        if "toxic" in name and "non" not in name and "not" not in name:
            return index
    return 1 if len(labels) > 1 else 0


class HFClassifierScorer:
    """A ``AutoModelForSequenceClassification`` (hub id or local directory) scoring the toxic label.

    Single-label models: softmax probability of the toxic label. Multi-label models
    (``problem_type == "multi_label_classification"``) and one-logit models: sigmoid, and for multi-label
    models every other label is reported as its own attribute too.
    """

    primary = "toxicity"

    def __init__(
        self,
        model: str,
        device: str | torch.device = "cpu",
        toxic_label: str | int | None = None,
        batch_size: int = 32,
        max_length: int = 512,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"The scorer batch size must be at least 1, not {batch_size}.")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = f"hf:{model}" + (f"#{toxic_label}" if toxic_label is not None else "")
        self.device = torch.device(device)
        self.batch_size = batch_size
        if model.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(model)):
            raise UserError(f"Classifier directory '{model}' does not exist.")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForSequenceClassification.from_pretrained(model)
        except Exception as exc:  # OSError (not found / offline), ValueError (not a classifier), ...
            log.debug("classifier load failed", exc_info=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"Could not load the classifier '{model}' (not found locally, not cached, or not a sequence "
                f"classifier): {first.rstrip('.')}."
            ) from None
        self.model.to(self.device).eval()
        config = self.model.config
        n_labels = int(config.num_labels)
        id2label = getattr(config, "id2label", None) or {}
        self.labels: tuple[str, ...] = tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(n_labels))
        self.toxic_index = pick_toxic_label(self.labels, toxic_label)
        self.multi_label = config.problem_type == "multi_label_classification" or n_labels == 1
        attributes = [self.primary]
        self._columns = [self.toxic_index]
        if self.multi_label:
            for index, label in enumerate(self.labels):
                name = _attribute_name(label)
                if index != self.toxic_index and name not in attributes:
                    attributes.append(name)
                    self._columns.append(index)
        self.attributes: tuple[str, ...] = tuple(attributes)
        limits = [max_length, getattr(config, "max_position_embeddings", max_length) or max_length]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 10**6:
            limits.append(tok_max)
        self.max_length = min(limits)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise UserError(f"The classifier '{model}' has a tokenizer without a padding or end token.")
            self.tokenizer.pad_token = self.tokenizer.eos_token
            config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Probability of the toxic label (and, for multi-label models, every label) per text."""
        texts = list(texts)
        chunks: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                enc = self.tokenizer(
                    batch, return_tensors="pt", truncation=True, padding=True, max_length=self.max_length
                ).to(self.device)
                logits = self.model(**enc).logits.float()
                probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
                chunks.append(probs.cpu())
        if not chunks:
            return {name: np.zeros(0, dtype=np.float64) for name in self.attributes}
        probs = torch.cat(chunks).numpy().astype(np.float64)
        return {name: probs[:, col] for name, col in zip(self.attributes, self._columns)}
