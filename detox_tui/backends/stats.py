"""Covariance statistics C_l = E[k k^T] of the MLP out-projection inputs, one forward pass for all layers, cached."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from detox_tui.errors import UserError
from detox_tui.events import EventCallback, Log, Progress, check_cancel, null_callback

log = logging.getLogger(__name__)

CACHE_FORMAT = "detox-tui-covariance/1"


class _StopForward(Exception):
    """Raised from the deepest needed layer's hook: nothing after it is needed, so skip the rest."""


def default_stats_tokens(lm: Any) -> int:
    """Default token budget: 20 x d_mlp keys (Gupta et al. 2025: ~10 x d_k keep >= 95% of editing quality)."""
    return 20 * int(lm.d_mlp)


def _builtin_neutral() -> list[str]:
    text = resources.files("detox_tui.data").joinpath("neutral.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _corpus_texts(corpus: str, texts: Sequence[str] | None) -> list[str]:
    if texts is not None:
        return [t for t in texts if t and t.strip()]
    try:
        from detox_tui.prompts import load_corpus  # type: ignore[attr-defined]
    except ImportError:
        load_corpus = None
    if load_corpus is not None:
        return [t for t in load_corpus(corpus) if t and t.strip()]
    if corpus == "builtin":
        return _builtin_neutral()
    raise UserError(
        f"The statistics corpus '{corpus}' cannot be read in this build; use --stats-corpus builtin."
    )


def _corpus_label(corpus: str, texts: Sequence[str] | None) -> str:
    """What the cache key says about the corpus: its name, or a digest of explicitly passed texts."""
    if texts is None:
        return corpus
    digest = hashlib.sha256("\x1e".join(texts).encode("utf-8")).hexdigest()[:16]
    return f"texts:{digest}"


def _token_docs(lm: Any, texts: Sequence[str], budget: int, max_length: int) -> list[list[int]]:
    """Tokenise documents (truncated to max_length) until exactly ``budget`` tokens, or all there are."""
    docs: list[list[int]] = []
    total = 0
    for text in texts:
        ids = lm.tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        ids = list(ids)[: budget - total]
        if not ids:
            continue
        docs.append(ids)
        total += len(ids)
        if total >= budget:
            break
    return docs


def _batches(
    docs: list[list[int]], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Right padding: real tokens keep their natural positions and never attend to the pads after them,
    # so every token's key is the same as in an unpadded forward whatever the tokenizer's padding side.
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        width = max(len(d) for d in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, doc in enumerate(chunk):
            ids[i, : len(doc)] = torch.tensor(doc, dtype=torch.long)
            mask[i, : len(doc)] = 1
        yield ids.to(device), mask.to(device)


def _acc_device(lm: Any) -> torch.device:
    # float64 is not supported on MPS: accumulate on the CPU there.
    return torch.device("cpu") if lm.device.type == "mps" else lm.device


def _cache_key(lm: Any, module_path: str, corpus_label: str, tokens: int) -> str:
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "model": lm.identity(),
            "module": module_path,
            "corpus": corpus_label,
            "tokens": int(tokens),
            "dtype": str(lm.dtype),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _checksum(tensor: torch.Tensor) -> str:
    t = tensor.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def _cache_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / "stats" / f"{key}.safetensors"


def _load_cached(path: Path, d_mlp: int) -> torch.Tensor | None:
    """The cached covariance, or None when absent; a corrupt or truncated file is logged and ignored."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensor = f.get_tensor("covariance")
        ok = (
            meta.get("format") == CACHE_FORMAT
            and tuple(tensor.shape) == (d_mlp, d_mlp)
            and tensor.dtype == torch.float64
            and meta.get("checksum") == _checksum(tensor)
        )
    except Exception as exc:  # safetensors raises its own error types for damaged files
        log.warning("covariance cache file %s is unreadable (%s); recomputing it", path, exc)
        return None
    if not ok:
        log.warning("covariance cache file %s failed its shape/checksum check; recomputing it", path)
        return None
    return tensor


def _save_cached(path: Path, cov: torch.Tensor, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    cov = cov.detach().contiguous().cpu()
    metadata = {**meta, "format": CACHE_FORMAT, "checksum": _checksum(cov)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        save_file({"covariance": cov}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("could not write the covariance cache %s: %s", path, exc)


# Keys are multiplied out in chunks of at least this many tokens: one float32 GEMM per chunk, then one
# float64 add. Per batch (a few hundred tokens) the d_mlp x d_mlp add would cost more than the GEMM.
_CHUNK_TOKENS = 2048


class _GramSum:
    """Streaming sum of k^T k for one layer: float32 products per chunk of keys, float64 running sum."""

    def __init__(self, d: int, device: torch.device, scratch: torch.Tensor) -> None:
        self.total = torch.zeros((d, d), dtype=torch.float64, device=device)
        self._scratch = scratch  # shared float32 d x d buffer for the chunk product
        self._pending: list[torch.Tensor] = []
        self._count = 0

    def add(self, flat: torch.Tensor) -> None:
        self._pending.append(flat)
        self._count += flat.shape[0]
        if self._count >= _CHUNK_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        chunk = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._count = [], 0
        torch.mm(chunk.T, chunk, out=self._scratch)
        self.total.add_(self._scratch)


def _collect(
    lm: Any,
    layers: Sequence[int],
    docs: list[list[int]],
    batch_size: int,
    emit: EventCallback,
    cancel: threading.Event | None,
    stage: str = "covariance",
    early_stop: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """One streaming pass over ``docs``: sum of k k^T for every layer in ``layers``.

    Keys are gathered (pads dropped) into chunks of about ``_CHUNK_TOKENS`` tokens; each chunk's Gram
    matrix is one float32 GEMM and is added into a float64 running sum, so the rounding error does not
    grow with the corpus. With ``early_stop`` the forward stops after the deepest needed layer; without
    it every batch runs the whole model (as the original MEMIT ``layer_stats`` does; for benchmarks).
    """
    acc_dev = _acc_device(lm)
    d_mlp = lm.d_mlp
    scratch = torch.empty((d_mlp, d_mlp), dtype=torch.float32, device=acc_dev)
    sums = {layer: _GramSum(d_mlp, acc_dev, scratch) for layer in layers}
    deepest = max(layers)
    current_mask: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, inputs, _output=None):
            sums[layer].add(inputs[0][current_mask["mask"]].to(acc_dev, torch.float32))
            if early_stop and layer == deepest:
                raise _StopForward

        return hook

    handles = [
        lm.module(lm.spec.mlp_out_path(layer)).register_forward_pre_hook(make_hook(layer)) for layer in layers
    ]
    total = sum(len(d) for d in docs)
    done = 0
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    try:
        emit(Progress(stage, 0, total))
        with torch.no_grad():
            for ids, mask in _batches(docs, batch_size, pad_id, lm.device):
                check_cancel(cancel)
                current_mask["mask"] = mask.bool()
                try:
                    lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
                done += int(mask.sum())
                emit(Progress(stage, done, total))
            for acc in sums.values():
                acc.flush()
    finally:
        for h in handles:
            h.remove()
    return {layer: acc.total.cpu() for layer, acc in sums.items()}, done


def _prepare(
    lm: Any,
    layers: Sequence[int],
    corpus: str,
    texts: Sequence[str] | None,
    tokens: int | None,
    max_length: int,
) -> tuple[list[int], int, str]:
    layers = sorted(set(lm.check_layers(list(layers))))
    if not layers:
        raise UserError("No layers were given for the covariance statistics.")
    budget = int(tokens) if tokens else default_stats_tokens(lm)
    if budget < 1:
        raise UserError(f"The statistics token budget must be positive, not {budget}.")
    return layers, budget, _corpus_label(corpus, texts)


def _finish(
    lm: Any,
    layers: list[int],
    budget: int,
    label: str,
    cache_dir: Path | None,
    computed: dict[int, torch.Tensor],
    count: int,
    emit: EventCallback,
) -> dict[int, torch.Tensor]:
    if count == 0:
        raise UserError("The statistics corpus gave no tokens; use a corpus with some text.")
    if count < budget:
        msg = f"the statistics corpus has only {count} tokens (budget {budget}); using what there is"
        log.warning(msg)
        emit(Log(msg, "warning"))
    out = {}
    for layer in layers:
        cov = computed[layer] / count
        out[layer] = cov
        if cache_dir is not None:
            path = _cache_file(Path(cache_dir), _cache_key(lm, lm.spec.mlp_out_path(layer), label, budget))
            meta = {
                "model": lm.identity(),
                "module": lm.spec.mlp_out_path(layer),
                "corpus": label,
                "tokens": str(count),
                "budget": str(budget),
                "dtype": str(lm.dtype),
            }
            _save_cached(path, cov, meta)
    return out


def covariance(
    lm: Any,
    layers: Sequence[int],
    *,
    corpus: str = "builtin",
    texts: Sequence[str] | None = None,
    tokens: int | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
) -> dict[int, torch.Tensor]:
    """C_l = mean over corpus tokens of k k^T (k = out-projection input, d_mlp), float64 on the CPU.

    Precision: the products k^T k are computed in float32 (one GEMM per chunk of ~2048 tokens and
    layer); the streaming sum across chunks, the division by the token count and the result are float64
    (agrees with an all-float64 computation to a relative error well under 1e-5; tested).

    All requested layers are collected in one forward pass per batch (pre-hooks on the out-projections;
    the forward stops after the deepest needed layer). Padding tokens are skipped. The budget is
    ``tokens`` (default ``default_stats_tokens``); a shorter corpus is used whole, with a warning. With
    ``cache_dir`` each layer is cached under ``cache_dir/stats`` (keyed by model identity, module, corpus,
    budget and dtype; checksummed, written atomically); cached layers are not recomputed.
    """
    layers, budget, label = _prepare(lm, layers, corpus, texts, tokens, max_length)
    result: dict[int, torch.Tensor] = {}
    if cache_dir is not None:
        for layer in layers:
            key = _cache_key(lm, lm.spec.mlp_out_path(layer), label, budget)
            cached = _load_cached(_cache_file(Path(cache_dir), key), lm.d_mlp)
            if cached is not None:
                result[layer] = cached
    missing = [layer for layer in layers if layer not in result]
    if missing:
        docs = _token_docs(lm, _corpus_texts(corpus, texts), budget, max_length)
        sums, count = _collect(lm, missing, docs, batch_size, emit, cancel)
        result.update(_finish(lm, missing, budget, label, cache_dir, sums, count, emit))
    else:
        emit(Progress("covariance", budget, budget, "cached"))
    return {layer: result[layer] for layer in layers}


def covariance_per_layer(
    lm: Any,
    layers: Sequence[int],
    *,
    corpus: str = "builtin",
    texts: Sequence[str] | None = None,
    tokens: int | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
    early_stop: bool = True,
) -> dict[int, torch.Tensor]:
    """The reference way: one pass over the corpus per layer (a baseline for benchmarks and tests).

    Each pass stops after its layer; ``early_stop=False`` runs the whole model every time, as the
    original MEMIT ``layer_stats`` does.
    """
    layers, budget, label = _prepare(lm, layers, corpus, texts, tokens, max_length)
    docs = _token_docs(lm, _corpus_texts(corpus, texts), budget, max_length)
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        if cache_dir is not None:
            key = _cache_key(lm, lm.spec.mlp_out_path(layer), label, budget)
            cached = _load_cached(_cache_file(Path(cache_dir), key), lm.d_mlp)
            if cached is not None:
                out[layer] = cached
                continue
        sums, count = _collect(
            lm,
            [layer],
            docs,
            batch_size,
            emit,
            cancel,
            stage=f"covariance layer {layer}",
            early_stop=early_stop,
        )
        out.update(_finish(lm, [layer], budget, label, cache_dir, sums, count, emit))
    return out
