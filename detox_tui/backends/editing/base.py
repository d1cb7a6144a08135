"""EditRequest, EditDelta (apply / revert / save / load) and the Editor protocol every method implements."""

from __future__ import annotations

import importlib
import json
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
    _originals: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def applied(self) -> bool:
        return self._originals is not None

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise UserError(f"The edit touches '{missing[0]}', which this model does not have.")
        for name, delta in self.deltas.items():
            if tuple(params[name].shape) != tuple(delta.shape):
                raise UserError(
                    f"The edit's delta for '{name}' has shape {tuple(delta.shape)} but the model's "
                    f"parameter has shape {tuple(params[name].shape)}."
                )
        return params

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
            "format": "detox-tui-edit-delta/1",
            "method": self.method,
            "model": self.model_name,
            "layers": list(self.layers),
            "hparams": self.hparams,
            "requests": self.requests,
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write the deltas as safetensors with a JSON header (in the safetensors metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.deltas.items()}
            save_file(tensors, str(path), metadata={"detox_tui": json.dumps(self.header())})
        except OSError as exc:
            raise UserError(f"Could not write the edit delta to '{path}': {exc.strerror or exc}.") from exc
        return path

    @classmethod
    def load(cls, path: str | Path) -> EditDelta:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"The edit delta file '{path}' does not exist.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise UserError(f"'{path}' is not a valid safetensors edit delta.") from exc
        if "detox_tui" not in meta:
            raise UserError(f"'{path}' is a safetensors file but not a detox-tui edit delta (no header).")
        header = json.loads(meta["detox_tui"])
        return cls(
            deltas=tensors,
            method=header.get("method", "?"),
            model_name=header.get("model", "?"),
            layers=list(header.get("layers", [])),
            hparams=header.get("hparams", {}),
            requests=header.get("requests", []),
            info=header.get("info", {}),
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
