"""Covariance statistics C_l = E[k k^T] of the MLP out-projection inputs, one forward pass for all layers, cached."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


STATS_DEVICES = ("auto", "cpu")


def _acc_device(lm: Any, stats_device: str = "auto") -> torch.device:
    """Where the statistics are accumulated: the model's device ("auto"; the CPU for MPS) or the CPU."""
    choice = str(stats_device or "auto").lower()
    if choice not in STATS_DEVICES:
        raise UserError(f"Unknown statistics device '{stats_device}'; use {' or '.join(STATS_DEVICES)}.")
    # float64 is not supported on MPS: accumulate on the CPU there.
    if choice == "cpu" or lm.device.type == "mps":
        return torch.device("cpu")
    return lm.device


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


def load_tensor_cache(
    path: Path, name: str, fmt: str, shape: tuple[int, ...]
) -> tuple[torch.Tensor, dict[str, str]] | None:
    """A cached float64 tensor ``name`` and its metadata, or None when absent; a file of another format, shape or
    checksum, or a corrupt or truncated one, is logged and ignored (the caller recomputes it)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensor = f.get_tensor(name)
        ok = (
            meta.get("format") == fmt
            and tuple(tensor.shape) == tuple(shape)
            and tensor.dtype == torch.float64
            and meta.get("checksum") == _checksum(tensor)
        )
    except Exception as exc:  # safetensors raises its own error types for damaged files
        log.warning("%s cache file %s is unreadable (%s); recomputing it", name, path, exc)
        return None
    if not ok:
        log.warning("%s cache file %s failed its shape/checksum check; recomputing it", name, path)
        return None
    return tensor, meta


def save_tensor_cache(
    path: Path, name: str, tensor: torch.Tensor, fmt: str, meta: dict[str, str], *, warn: bool = True
) -> str | None:
    """Write ``tensor`` as ``name`` with ``meta``, its format and checksum, atomically.

    A failure (a read-only or full cache folder) never raises: it returns why (and logs a warning unless ``warn`` is
    False, for callers that report several files at once); None when the file was written.
    """
    from safetensors.torch import save_file

    tensor = tensor.detach().contiguous().cpu()
    metadata = {**meta, "format": fmt, "checksum": _checksum(tensor)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        reason = exc.strerror or str(exc)
        if warn:
            log.warning(
                "could not write the %s cache %s (%s); it is used for this run only", name, path, reason
            )
        return reason
    return None


def _load_cached(path: Path, d_mlp: int) -> torch.Tensor | None:
    """The cached covariance, or None when absent or damaged."""
    cached = load_tensor_cache(path, "covariance", CACHE_FORMAT, (d_mlp, d_mlp))
    return None if cached is None else cached[0]


def _save_cached(path: Path, cov: torch.Tensor, meta: dict[str, str]) -> str | None:
    return save_tensor_cache(path, "covariance", cov, CACHE_FORMAT, meta, warn=False)


# Keys are multiplied out in chunks of at least this many tokens: one float32 GEMM per chunk, then one
# float64 add. Per batch (a few hundred tokens) the d_mlp x d_mlp add would cost more than the GEMM.
_CHUNK_TOKENS = 2048

# ------------------------------------------------------------------------------------------ memory plan

# An artificial cap on the accumulation memory (bytes, or with a K/M/G suffix: "512M", "1.5G").
STATS_MEMORY_ENV = "DETOX_TUI_STATS_MEMORY"
# Share of the free CUDA memory the accumulation may take; the rest is left to the forward passes.
_CUDA_FREE_SHARE = 0.9
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def format_bytes(n: float) -> str:
    """Decimal units, one decimal: 822083584 -> '0.8 GB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size / 10:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """'2G', '512MB', '1.5GiB' or a plain number of bytes; one clear sentence when it is none of these."""
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("BKMGTI")
    unit = raw[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        value = -1.0
    if not value > 0:
        raise UserError(
            f"The statistics memory budget '{text}' is not a positive size; write e.g. 2G, 512M or 1000000."
        )
    return int(value)


def model_bytes(model: torch.nn.Module) -> int:
    """The model's own memory: parameters and buffers, each numel x element size."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class StatsMemoryPlan:
    """What the accumulation holds on its device, and how the layers are grouped into passes that fit.

    Per layer in a pass: the float64 running sum (8 d_mlp^2 bytes) and the float32 keys waiting for the
    next chunk product (fewer than ``_CHUNK_TOKENS`` + one batch of tokens, x d_mlp x 4 bytes). Shared by
    a pass: one float32 d_mlp x d_mlp product buffer (4 d_mlp^2) and one concatenated chunk of keys. On
    the CPU the finished passes' float64 results stay in the same memory, so they count for later passes;
    from a GPU they move to the CPU after each pass. The model itself (``model_bytes``) is already loaded:
    it is reported, not counted against ``budget_bytes`` (what is free besides it).
    """

    device: str
    d_mlp: int
    layers: tuple[int, ...]
    chunk_rows: int
    model_bytes: int
    budget_bytes: int | None
    budget_source: str
    results_in_budget: bool
    groups: tuple[tuple[int, ...], ...]

    @property
    def float32_bytes(self) -> int:
        """One d_mlp x d_mlp float32 matrix (the chunk product)."""
        return self.d_mlp * self.d_mlp * 4

    @property
    def float64_bytes(self) -> int:
        """One d_mlp x d_mlp float64 matrix (a layer's running sum, and its result)."""
        return self.d_mlp * self.d_mlp * 8

    @property
    def chunk_bytes(self) -> int:
        """The float32 keys one layer holds before its next chunk product."""
        return self.chunk_rows * self.d_mlp * 4

    @property
    def per_layer_bytes(self) -> int:
        return self.float64_bytes + self.chunk_bytes

    @property
    def shared_bytes(self) -> int:
        return self.float32_bytes + self.chunk_bytes

    def pass_bytes(self, n_layers: int, held_layers: int = 0) -> int:
        """Peak accumulation memory of a pass over ``n_layers`` after ``held_layers`` finished (CPU only)."""
        held = held_layers * self.float64_bytes if self.results_in_budget else 0
        return self.shared_bytes + n_layers * self.per_layer_bytes + held

    @property
    def one_pass_bytes(self) -> int:
        """Accumulation memory with every layer in one pass."""
        return self.pass_bytes(len(self.layers))

    @property
    def total_bytes(self) -> int:
        """One pass for all layers plus the model's own memory."""
        return self.one_pass_bytes + self.model_bytes

    @property
    def passes(self) -> int:
        return len(self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "d_mlp": self.d_mlp,
            "layers": list(self.layers),
            "float32_matrix_bytes": self.float32_bytes,
            "float64_matrix_bytes": self.float64_bytes,
            "chunk_bytes_per_layer": self.chunk_bytes,
            "per_layer_bytes": self.per_layer_bytes,
            "shared_bytes": self.shared_bytes,
            "one_pass_bytes": self.one_pass_bytes,
            "model_bytes": self.model_bytes,
            "total_bytes": self.total_bytes,
            "budget_bytes": self.budget_bytes,
            "budget_source": self.budget_source,
            "groups": [list(g) for g in self.groups],
        }


def plan_stats_memory(
    d_mlp: int,
    layers: Sequence[int],
    *,
    batch_tokens: int,
    budget_tokens: int | None = None,
    model_bytes: int = 0,
    budget_bytes: int | None = None,
    budget_source: str = "no limit",
    device: str = "cpu",
    results_in_budget: bool | None = None,
    refuse: bool = True,
) -> StatsMemoryPlan:
    """Estimate the accumulation's memory and group ``layers`` into passes that fit ``budget_bytes``.

    ``batch_tokens``: the most tokens one forward batch gives (batch size x max length). Greedy: each pass
    takes as many of the remaining layers (in order) as fit. Nothing fitting, not even one layer, is a
    UserError that gives the numbers, raised before any forward pass (with ``refuse=False``: no groups).
    """
    layers = tuple(layers)
    rows = _CHUNK_TOKENS - 1 + max(1, int(batch_tokens))
    if budget_tokens:
        rows = min(rows, int(budget_tokens))
    if results_in_budget is None:
        results_in_budget = device == "cpu"
    plan = StatsMemoryPlan(
        device=device,
        d_mlp=int(d_mlp),
        layers=layers,
        chunk_rows=rows,
        model_bytes=int(model_bytes),
        budget_bytes=None if budget_bytes is None else int(budget_bytes),
        budget_source=budget_source,
        results_in_budget=bool(results_in_budget),
        groups=(),
    )
    if budget_bytes is None:
        return _with_groups(plan, (layers,) if layers else ())
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    held = 0
    for layer in layers:
        if plan.pass_bytes(len(current) + 1, held) <= budget_bytes:
            current.append(layer)
            continue
        if current:
            groups.append(tuple(current))
            held += len(current)
            current = []
        if plan.pass_bytes(1, held) > budget_bytes:
            if not refuse:
                return _with_groups(plan, ())
            raise UserError(_refusal(plan, held))
        current.append(layer)
    if current:
        groups.append(tuple(current))
    return _with_groups(plan, tuple(groups))


def _with_groups(plan: StatsMemoryPlan, groups: tuple[tuple[int, ...], ...]) -> StatsMemoryPlan:
    from dataclasses import replace

    return replace(plan, groups=groups)


def _refusal(plan: StatsMemoryPlan, held: int) -> str:
    need = plan.pass_bytes(1, held)
    kept = f", with {held} finished layers' results kept there," if held and plan.results_in_budget else ""
    advice = "free some memory or use fewer layers" if plan.device == "cpu" else "use --stats-device cpu"
    return (
        f"The covariance statistics need {format_bytes(need)} on {plan.device} for one layer{kept} "
        f"(d_mlp {plan.d_mlp}: a {format_bytes(plan.float64_bytes)} float64 sum, a "
        f"{format_bytes(plan.float32_bytes)} float32 product and {format_bytes(2 * plan.chunk_bytes)} of key "
        f"chunks) but only {format_bytes(plan.budget_bytes or 0)} is available ({plan.budget_source}); "
        f"{advice}."
    )


def _available_cpu_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no limit is imposed)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memory_budget(acc_dev: torch.device, memory_budget: int | str | None) -> tuple[int | None, str]:
    """The bytes the accumulation may use, and where that number comes from."""
    if memory_budget is not None:
        return parse_bytes(str(memory_budget)), "memory_budget"
    env = os.environ.get(STATS_MEMORY_ENV, "").strip()
    if env:
        return parse_bytes(env), STATS_MEMORY_ENV
    if acc_dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(acc_dev)
        return int(free * _CUDA_FREE_SHARE), f"{int(_CUDA_FREE_SHARE * 100)}% of the free memory on {acc_dev}"
    if acc_dev.type == "cpu":
        available = _available_cpu_bytes()
        if available is not None:
            return available, "available system memory"
    return None, "no limit"


def stats_memory_plan(
    lm: Any,
    layers: Sequence[int],
    *,
    stats_device: str = "auto",
    batch_size: int = 8,
    max_length: int = 256,
    tokens: int | None = None,
    memory_budget: int | str | None = None,
    refuse: bool = True,
) -> StatsMemoryPlan:
    """The memory plan ``covariance`` follows for this model, layers and settings (see StatsMemoryPlan).

    The budget is ``memory_budget`` (bytes or "2G"), else ``$DETOX_TUI_STATS_MEMORY``, else 90% of the
    free CUDA memory (torch.cuda.mem_get_info) on a GPU, else the available system memory on the CPU.
    """
    acc_dev = _acc_device(lm, stats_device)
    budget, source = _memory_budget(acc_dev, memory_budget)
    return plan_stats_memory(
        lm.d_mlp,
        sorted(set(layers)),
        batch_tokens=int(batch_size) * int(max_length),
        budget_tokens=int(tokens) if tokens else default_stats_tokens(lm),
        model_bytes=model_bytes(lm.model),
        budget_bytes=budget,
        budget_source=source,
        device=str(acc_dev),
        results_in_budget=acc_dev.type == "cpu",
        refuse=refuse,
    )


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
    acc_dev: torch.device | None = None,
    message: str = "",
) -> tuple[dict[int, torch.Tensor], int]:
    """One streaming pass over ``docs``: sum of k k^T for every layer in ``layers``.

    Keys are gathered (pads dropped) into chunks of about ``_CHUNK_TOKENS`` tokens; each chunk's Gram
    matrix is one float32 GEMM and is added into a float64 running sum, so the rounding error does not
    grow with the corpus. With ``early_stop`` the forward stops after the deepest needed layer; without
    it every batch runs the whole model (as the original MEMIT ``layer_stats`` does; for benchmarks).
    """
    acc_dev = acc_dev if acc_dev is not None else _acc_device(lm)
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
        emit(Progress(stage, 0, total, message))
        with torch.no_grad():
            for ids, mask in _batches(docs, batch_size, pad_id, lm.device):
                check_cancel(cancel)
                current_mask["mask"] = mask.bool()
                try:
                    lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
                done += int(mask.sum())
                emit(Progress(stage, done, total, message))
            for acc in sums.values():
                acc.flush()
    finally:
        for h in handles:
            h.remove()
    del scratch
    return {layer: sums.pop(layer).total.cpu() for layer in list(sums)}, done


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
    warn: bool = True,
) -> dict[int, torch.Tensor]:
    if count == 0:
        raise UserError("The statistics corpus gave no tokens; use a corpus with some text.")
    if count < budget and warn:
        msg = f"the statistics corpus has only {count} tokens (budget {budget}); using what there is"
        log.warning(msg)
        emit(Log(msg, "warning"))
    out = {}
    not_cached: dict[int, str] = {}
    for layer in layers:
        # In place (bitwise the same as ``/``): the running sum becomes the result, no second d x d copy.
        cov = computed.pop(layer).div_(count)
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
            reason = _save_cached(path, cov, meta)
            if reason is not None:
                not_cached[layer] = reason
    if not_cached:  # one warning for all layers; the statistics are still returned and used
        log.warning(
            "could not cache the covariance statistics of layer%s %s in %s (%s); they are used for this run only",
            "s" if len(not_cached) > 1 else "",
            ", ".join(map(str, not_cached)),
            _cache_file(Path(cache_dir), "x").parent,
            next(iter(not_cached.values())),
        )
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
    stats_device: str = "auto",
    memory_budget: int | str | None = None,
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

    Memory: before any forward pass the accumulation's memory is planned (``stats_memory_plan``) on
    ``stats_device`` ("auto": the model's device; "cpu" keeps it off the GPU) against ``memory_budget``
    (default: ``$DETOX_TUI_STATS_MEMORY``, else 90% of the free CUDA memory, else the available system
    memory). Layers that do not fit together are streamed: one pass over the corpus per group of layers
    that fits, giving the same statistics; a UserError with the numbers when not even one layer fits.
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
        acc_dev = _acc_device(lm, stats_device)
        plan = stats_memory_plan(
            lm,
            missing,
            stats_device=stats_device,
            batch_size=batch_size,
            max_length=max_length,
            tokens=budget,
            memory_budget=memory_budget,
        )
        log.info(
            "covariance memory on %s: %s for %d layers in one pass (+ model %s), budget %s (%s): %d pass(es)",
            plan.device,
            format_bytes(plan.one_pass_bytes),
            len(missing),
            format_bytes(plan.model_bytes),
            "none" if plan.budget_bytes is None else format_bytes(plan.budget_bytes),
            plan.budget_source,
            plan.passes,
        )
        if plan.passes > 1:
            emit(
                Log(
                    f"covariance statistics for {len(missing)} layers need {format_bytes(plan.one_pass_bytes)} "
                    f"on {plan.device} but {format_bytes(plan.budget_bytes or 0)} is available: "
                    f"{plan.passes} passes over the corpus (layers "
                    + "; ".join(",".join(map(str, g)) for g in plan.groups)
                    + ")"
                )
            )
        docs = _token_docs(lm, _corpus_texts(corpus, texts), budget, max_length)
        for n, group in enumerate(plan.groups):
            message = f"pass {n + 1} of {plan.passes}" if plan.passes > 1 else ""
            sums, count = _collect(
                lm, list(group), docs, batch_size, emit, cancel, acc_dev=acc_dev, message=message
            )
            result.update(_finish(lm, list(group), budget, label, cache_dir, sums, count, emit, warn=n == 0))
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
