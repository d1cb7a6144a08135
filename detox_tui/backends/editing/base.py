"""EditRequest, EditDelta (apply / revert / save / load) and the Editor protocol every method implements."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from detox_tui.errors import UserError
from detox_tui.events import EventCallback, null_callback

log = logging.getLogger(__name__)

# The header's format: /2 files carry a checksum over the header and every tensor; /1 files (older) carry none.
DELTA_FORMAT = "detox-tui-edit-delta/2"
_UNCHECKED_DELTA_FORMATS = ("detox-tui-edit-delta/1",)


def delta_checksum(header_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the header exactly as stored and each tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256(header_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(b"\0" + name.encode("utf-8") + b"\0" + f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _header_problem(header: dict[str, Any]) -> str | None:
    """What is wrong with a delta file's header fields, or None."""
    checks = (
        ("method", lambda v: isinstance(v, str) and v.strip() != ""),
        ("model", lambda v: isinstance(v, str) and v.strip() != ""),
        (
            "layers",
            lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
        ),
        ("hparams", lambda v: isinstance(v, dict)),
        ("requests", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v)),
        ("info", lambda v: isinstance(v, dict)),
    )
    wanted = {
        "method": "a method name",
        "model": "a model name",
        "layers": "a list of layer numbers",
        "hparams": "an object",
        "requests": "a list of objects",
        "info": "an object",
    }
    for key, ok in checks:
        if key not in header:
            return f"it has no '{key}'"
        if not ok(header[key]):
            return f"'{key}' must be {wanted[key]}"
    return None


@dataclass(frozen=True)
class EditRequest:
    """One edit: make ``target`` likely after ``prompt`` (replace) or make ``toxic`` unlikely (erase).

    ``subject`` is an optional span of the prompt whose last token is the key position; by default the
    key is the prompt's last token. ``toxic`` is the continuation to erase (mode ``erase``; by default
    the model's own most toxic baseline sample) and is also DINM's unsafe response.
    """

    prompt: str
    target: str
    subject: str | None = None
    mode: str = "replace"
    toxic: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("replace", "erase"):
            raise UserError(f"Unknown edit mode '{self.mode}'; use replace or erase.")
        if self.subject is not None and self.subject not in self.prompt:
            raise UserError(f"The subject '{self.subject}' does not occur in the prompt '{self.prompt}'.")
        if self.mode == "erase" and not self.toxic:
            raise UserError(f"Erase mode needs a toxic continuation to erase for the prompt '{self.prompt}'.")
        if self.mode == "replace" and not self.target:
            raise UserError(f"The prompt '{self.prompt}' has no safe target continuation to edit towards.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EditDelta:
    """Per-parameter weight deltas (in each parameter's own layout) plus what produced them.

    Weights change only through ``apply``; ``revert`` restores the saved original tensors (bit-exact,
    never by subtraction). ``info`` carries method-specific facts (e.g. DINM's located layer per request).
    """

    deltas: dict[str, torch.Tensor]
    method: str
    model_name: str
    layers: list[int] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # The file it was loaded from (named in errors), None for a delta computed in this process.
    source: str | None = field(default=None, repr=False, compare=False)
    _originals: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def applied(self) -> bool:
        return self._originals is not None

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        what = (
            "The edit"
            if self.source is None
            else f"The edit delta '{self.source}' (computed on '{self.model_name}')"
        )
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise UserError(f"{what} touches '{missing[0]}', which this model does not have.")
        for name, delta in self.deltas.items():
            if tuple(params[name].shape) != tuple(delta.shape):
                raise UserError(
                    f"{what} has shape {tuple(delta.shape)} for '{name}' but this model's parameter has shape "
                    f"{tuple(params[name].shape)}."
                )
        return params

    def check(self, model: nn.Module) -> None:
        """Refuse (UserError, one sentence) a delta whose parameters this model lacks or has in another shape."""
        self._params(model)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Add the deltas to the model's weights, keeping a copy of the originals for revert."""
        if self.applied:
            raise RuntimeError("This EditDelta is already applied; revert it first.")
        params = self._params(model)
        originals = {name: params[name].detach().clone() for name in self.deltas}
        try:
            for name, delta in self.deltas.items():
                p = params[name]
                p.copy_((p.to(torch.float32) + delta.to(p.device, torch.float32)).to(p.dtype))
        except BaseException:
            for name, orig in originals.items():
                params[name].copy_(orig)
            raise
        self._originals = originals

    @torch.no_grad()
    def revert(self, model: nn.Module) -> None:
        """Restore the exact original tensors saved by ``apply``."""
        if self._originals is None:
            return
        params = dict(model.named_parameters())
        for name, orig in self._originals.items():
            params[name].copy_(orig)
        self._originals = None

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[EditDelta]:
        """Apply for the duration of a ``with`` block; always revert, also on exceptions and cancel."""
        self.apply(model)
        try:
            yield self
        finally:
            self.revert(model)

    def header(self) -> dict[str, Any]:
        return {
            "format": DELTA_FORMAT,
            "method": self.method,
            "model": self.model_name,
            "layers": list(self.layers),
            "hparams": self.hparams,
            "requests": self.requests,
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write the deltas as safetensors with a JSON header and a checksum (in the safetensors metadata).

        Written to a temporary file beside ``path`` and renamed, so a crash never leaves half a delta.
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.deltas.items()}
        header_json = json.dumps(self.header())
        metadata = {"detox_tui": header_json, "checksum": delta_checksum(header_json, tensors)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"Could not write the edit delta to '{path}': {exc.strerror or exc}.") from exc
        return path

    @classmethod
    def load(cls, path: str | Path) -> EditDelta:
        """Read a delta saved by ``save``, verified: its checksum (a damaged or changed file is refused), its
        header fields, at least one tensor, and every value finite. Each problem is one UserError naming the file.
        Files of the older format (no checksum) load with a warning that they cannot be verified."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"The edit delta file '{path}' does not exist.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            log.debug("reading %s failed", path, exc_info=True)
            raise UserError(
                f"'{path}' is not a valid safetensors edit delta (it is damaged or truncated)."
            ) from exc
        if "detox_tui" not in meta:
            raise UserError(f"'{path}' is a safetensors file but not a detox-tui edit delta (no header).")
        try:
            header = json.loads(meta["detox_tui"])
        except (json.JSONDecodeError, RecursionError):
            raise UserError(f"The edit delta '{path}' has a damaged header (not valid JSON).") from None
        if not isinstance(header, dict):
            raise UserError(f"The edit delta '{path}' has a bad header: it is not an object.")
        fmt = header.get("format")
        if fmt == DELTA_FORMAT:
            if meta.get("checksum") != delta_checksum(meta["detox_tui"], tensors):
                raise UserError(
                    f"The edit delta '{path}' failed its checksum: the file is damaged or was changed after it "
                    "was saved."
                )
        elif fmt in _UNCHECKED_DELTA_FORMATS:
            log.warning(
                "the edit delta %s has no checksum (an older format), so damage to it cannot be detected",
                path,
            )
        else:
            raise UserError(
                f"The edit delta '{path}' has an unknown format {fmt!r}; expected '{DELTA_FORMAT}'."
            )
        problem = _header_problem(header)
        if problem:
            raise UserError(f"The edit delta '{path}' has a bad header: {problem}.")
        if not tensors:
            raise UserError(f"The edit delta '{path}' holds no tensors.")
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                raise UserError(
                    f"The edit delta '{path}' holds '{name}' as {tensor.dtype}, not floating point."
                )
            if not bool(torch.isfinite(tensor).all()):
                raise UserError(f"The edit delta '{path}' has NaN or infinite values in '{name}'.")
        return cls(
            deltas=tensors,
            method=header["method"],
            model_name=header["model"],
            layers=list(header["layers"]),
            hparams=header["hparams"],
            requests=header["requests"],
            info=header["info"],
            source=str(path),
        )


@dataclass
class EditContext:
    """What an editor may use besides the model: events, a cancel flag, caches and statistics."""

    emit: EventCallback = null_callback
    cancel: threading.Event | None = None
    cache_dir: Path | None = None
    stats_corpus: str = "builtin"
    stats_tokens: int | None = None
    # Optional pre-computed covariance provider: callable(lm, layers) -> {layer: C (d_mlp x d_mlp, float64)}.
    covariance: Any = None
    # Optional general/neutral prompts for KL terms (DINM) and sentence sets (AurA).
    neutral_prompts: Sequence[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Capabilities:
    """What an editor needs, declared as class attributes: the engine and both front ends branch on these,
    never on the method's name (see ``editor_class`` and detox_tui.pipeline.validation)."""

    name: str = ""
    # How the method is written for people ("MEMIT", "AurA").
    title: str = ""
    # The hparams key that holds the edited layers: "layers" (a list) or "layer" (one index).
    layers_key: str = "layers"
    # Edits exactly one layer (ROME; DINM when its layer is given): several layers are refused up front.
    single_layer: bool = False
    # The layers may be left out: the method locates its own (DINM) or edits every layer (AurA).
    layers_optional: bool = False
    # Finds the layer to edit per request (DINM): the located layer is reported per prompt.
    locates_layer: bool = False
    # Uses second-moment statistics of the MLP keys (MEMIT, ROME): an ablation computes them once for all.
    needs_covariance: bool = False
    # Makes one edit from its own data and ignores the requests (AurA): one edit serves every prompt.
    request_free: bool = False
    # Replace mode needs a safe target continuation for every edited prompt.
    needs_targets: bool = True
    # Hyperparameters accepted beyond those in the method's preset section, with the value meaning "not set".
    optional_hparams: Mapping[str, Any] = {}
    # What to try when an edit does not reach its target (shown with the convergence warning).
    convergence_advice: str = "other layers or hyperparameters"


class Editor(Protocol):
    """Every editing method. ``compute`` returns an EditDelta and leaves the model's weights unchanged.

    A method may apply partial updates while it works (MEMIT edits layer by layer) but must restore the
    original weights before returning or raising, including on cancel. Its capabilities are the class
    attributes of ``Capabilities``.
    """

    name: str
    title: str
    layers_key: str
    single_layer: bool
    layers_optional: bool
    locates_layer: bool
    needs_covariance: bool
    request_free: bool
    needs_targets: bool
    optional_hparams: Mapping[str, Any]
    convergence_advice: str

    def default_hparams(self, lm: Any) -> dict[str, Any]:
        """The preset for this model (from the presets data), as a plain dict."""
        ...

    def compute(
        self,
        lm: Any,
        requests: Sequence[EditRequest],
        hparams: Mapping[str, Any],
        ctx: EditContext,
    ) -> EditDelta: ...


EDITORS: dict[str, str] = {
    "memit": "detox_tui.backends.editing.memit:MemitEditor",
    "alphaedit": "detox_tui.backends.editing.alphaedit:AlphaEditEditor",
    "rome": "detox_tui.backends.editing.rome:RomeEditor",
    "ft": "detox_tui.backends.editing.ft:FineTuneEditor",
    "dinm": "detox_tui.backends.editing.dinm:DinmEditor",
    "aura": "detox_tui.backends.editing.aura:AuraEditor",
}


def editor_class(method: str) -> type[Editor]:
    """The editor class registered as ``method`` (not instantiated): read its capabilities from it."""
    key = (method or "").lower()
    if key not in EDITORS:
        raise UserError(f"Unknown editing method '{method}'; choose one of: {', '.join(EDITORS)}.")
    module_name, cls_name = EDITORS[key].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise UserError(f"The editing method '{method}' is not available in this build.") from exc
        raise
    return getattr(module, cls_name)


def get_editor(method: str) -> Editor:
    """Instantiate an editor by name, with a clear error for unknown or not-yet-available methods."""
    return editor_class(method)()
