"""Detoxify scorer: every attribute the Detoxify checkpoint predicts, sigmoid probabilities, batched."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _needs_pickle(exc: BaseException) -> bool:
    """Whether torch's weights-only unpickler refused the file for an object it may not build (a pickled class or
    call), rather than for damage."""
    text = str(exc)
    return "GLOBAL" in text or "Can only " in text


def read_torch_checkpoint(path: str | os.PathLike[str], label: str, *, trust: bool = False) -> Any:
    """``torch.load`` without pickle; a file that needs pickle is refused unless ``trust`` (then loaded with a warning).

    ``label`` names the file in the one-sentence UserError for a file that needs pickle, is damaged or unreadable.
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _needs_pickle(exc):
            log.debug("weights-only load of %s failed", label, exc_info=True)
            raise UserError(f"{label} is damaged or not a PyTorch checkpoint.") from None
        if not trust:
            raise UserError(
                f"{label} can only be loaded with pickle, which can run code; it was refused "
                "(pass --trust-checkpoint if you trust where it came from)."
            ) from None
    except (RuntimeError, OSError, EOFError, ValueError):
        log.debug("weights-only load of %s failed", label, exc_info=True)
        raise UserError(f"{label} is damaged or not a PyTorch checkpoint.") from None
    log.warning("loading %s with pickle (--trust-checkpoint): unpickling can run code", label)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a trusted pickle can still be damaged in any way
        raise UserError(f"{label} is damaged or not a PyTorch checkpoint ({_first_line(exc)}).") from None


def load_detoxify_checkpoint(
    variant: str, checkpoint: str | os.PathLike[str] | None, *, trust: bool = False
) -> Any:
    """The Detoxify checkpoint dict of a local file, or of ``variant``'s hub weights (downloaded once into the torch
    hub cache), opened without pickle unless ``trust``."""
    if checkpoint is not None:
        return read_torch_checkpoint(checkpoint, f"Detoxify checkpoint '{checkpoint}'", trust=trust)
    from detoxify.detoxify import MODEL_URLS

    path = cached_checkpoint_path(variant)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(MODEL_URLS[variant], str(path), progress=False)
        except Exception as exc:  # noqa: BLE001 - urllib / OS errors when offline or the cache is read-only
            log.debug("Detoxify download failed", exc_info=True)
            raise UserError(
                f"Detoxify '{variant}' weights are not cached in {path.parent} and could not be downloaded "
                f"({type(exc).__name__}); connect once to download them, or {_LOCAL_HINT}."
            ) from None
    return read_torch_checkpoint(path, f"Detoxify '{variant}' weights '{path}'", trust=trust)


_ARCH_ARGS = {"model_type": str, "model_name": str, "tokenizer_name": str, "num_classes": int}


def _checkpoint_parts(loaded: Any, source: str) -> tuple[dict[str, Any], list[str], dict[str, torch.Tensor]]:
    """The architecture arguments, class names and state dict of a Detoxify checkpoint dict, checked."""

    def bad(why: str) -> UserError:
        return UserError(f"{source} is not a valid Detoxify checkpoint ({why}).")

    if not isinstance(loaded, Mapping) or "config" not in loaded or "state_dict" not in loaded:
        raise bad("it needs the config it was trained with and the state dict")
    try:
        args = loaded["config"]["arch"]["args"]
        classes = loaded["config"]["dataset"]["args"]["classes"]
    except (KeyError, TypeError, IndexError):
        raise bad("its config has no arch.args or dataset.args.classes") from None
    if not isinstance(args, Mapping):
        raise bad("arch.args is not a mapping")
    for key, kind in _ARCH_ARGS.items():
        if not isinstance(args.get(key), kind) or isinstance(args.get(key), bool):
            raise bad(f"arch.args.{key} is missing or not a {kind.__name__}")
    # Class names are looked up on transformers: only sequence classifiers and tokenizers, never anything else.
    if not (args["model_name"].isidentifier() and args["model_name"].endswith("ForSequenceClassification")):
        raise bad(f"'{args['model_name']}' is not a sequence classification model class")
    if not (
        args["tokenizer_name"].isidentifier()
        and args["tokenizer_name"].endswith(("Tokenizer", "TokenizerFast"))
    ):
        raise bad(f"'{args['tokenizer_name']}' is not a tokenizer class")
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise bad("dataset.args.classes is not a list of names")
    if len(classes) != args["num_classes"]:
        raise bad(f"{len(classes)} class names for {args['num_classes']} classes")
    state_dict = loaded["state_dict"]
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise bad("the state dict is empty")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise bad("the state dict holds something other than named tensors")
    return {key: args[key] for key in _ARCH_ARGS}, list(classes), dict(state_dict)


class DetoxifyScorer:
    """Wraps ``detoxify.Detoxify``; ``attributes`` are the checkpoint's class names (toxicity first).

    ``checkpoint`` loads a local Detoxify checkpoint instead of the hub weights; ``huggingface_config_path``
    is a directory with the model's HF config and tokenizer, for fully offline loading. Checkpoints are opened
    without pickle (``torch.load(weights_only=True)``); one that needs pickle is refused unless
    ``trust_checkpoint`` (then it is loaded with a warning: unpickling can run code).
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
        trust_checkpoint: bool = False,
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
        model, self.tokenizer, names = self._load(
            variant, checkpoint, huggingface_config_path, trust_checkpoint
        )
        self.model = model.eval()
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", max_length)]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 10**6:
            limits.append(tok_max)
        if getattr(self.model.config, "model_type", "") in ("roberta", "xlm-roberta"):
            limits[1] -= 2  # RoBERTa position ids start after the padding index
        self.max_length = min(limits)
        if self.primary not in names:
            raise UserError(
                f"Detoxify checkpoint '{self.name}' has no 'toxicity' class (it has {', '.join(names)})."
            )
        self._order = [names.index(self.primary)] + [i for i, n in enumerate(names) if n != self.primary]
        self.attributes: tuple[str, ...] = tuple(names[i] for i in self._order)

    def _load(self, variant: str, checkpoint, config_path, trust: bool):
        """Detoxify's model, tokenizer and class names, built from a checkpoint opened without pickle."""
        from detoxify.detoxify import get_model_and_tokenizer

        loaded = load_detoxify_checkpoint(variant, checkpoint, trust=trust)
        source = self.name if checkpoint is None else f"Detoxify checkpoint '{checkpoint}'"
        arch_args, classes, state_dict = _checkpoint_parts(loaded, source)
        try:
            model, tokenizer = get_model_and_tokenizer(
                **arch_args,
                state_dict=state_dict,
                huggingface_config_path=None if config_path is None else str(config_path),
            )
        except Exception as exc:  # transformers raises many types when offline or on a mismatched state dict
            log.debug("Detoxify load failed", exc_info=True)
            if checkpoint is not None and isinstance(exc, (ValueError, KeyError, TypeError, RuntimeError)):
                raise UserError(
                    f"Detoxify checkpoint '{checkpoint}' is not a valid Detoxify checkpoint ({_first_line(exc)})."
                ) from None
            raise UserError(
                f"Detoxify could not load the Hugging Face config/tokenizer for '{self.name}' "
                f"({type(exc).__name__}: {_first_line(exc)}); connect once so they are cached, or {_LOCAL_HINT}."
            ) from None
        # detoxify's names for the original model's classes
        renamed = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}
        return model.to(self.device), tokenizer, [renamed.get(c, c) for c in classes]

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
