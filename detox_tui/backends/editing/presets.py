"""Hyperparameter presets (data files per model family) and their validation against the loaded model."""

from __future__ import annotations

import copy
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from detox_tui.errors import UserError

# The registered methods (detox_tui.backends.editing.base.EDITORS), listed here for front ends that must not
# import torch; a test keeps the two equal. What each method needs is its editor's class attributes.
METHODS: tuple[str, ...] = ("memit", "alphaedit", "rome", "ft", "dinm", "aura")
LAYER_KEYS = ("layer", "v_loss_layer")
# String hyperparameters that take one of a fixed set of values. ROME's key_form: "consistent" (r-ROME,
# Gupta et al. 2024, the default in every preset) or "reference" (exactly kmeng01/rome); see rome.py.
CHOICES: dict[str, tuple[str, ...]] = {
    "objective": ("ft-m", "ft-l"),
    "key_form": ("consistent", "reference"),
    # AurA's MLP hidden unit: the neuron (the out-projection's input) or the gate (the in-projection's output).
    "unit": ("neuron", "gate"),
}
AT_LEAST_ONE = ("v_num_grad_steps", "steps", "n_templates", "template_length", "max_sentences")


def _family_file(family: str) -> str:
    path = resources.files("detox_tui").joinpath("presets", f"{family}.json")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UserError(f"There are no hyperparameter presets for the '{family}' model family.") from exc


def family_presets(family: str) -> dict[str, Any]:
    """The parsed preset file of a model family (a fresh copy the caller may change)."""
    return json.loads(_family_file(family))


def _check_method(method: str) -> str:
    key = (method or "").lower()
    if key not in METHODS:
        raise UserError(f"Unknown editing method '{method}'; choose one of: {', '.join(METHODS)}.")
    return key


def _capabilities(method: str) -> Any:
    """The editor class of ``method`` (its capabilities are class attributes); imported on first use."""
    from detox_tui.backends.editing.base import editor_class

    return editor_class(method)


def model_key(lm: Any) -> str:
    """How a model is named in the preset files: the last part of its hub id or directory, lower case."""
    return Path(str(lm.name).rstrip("/")).name.lower()


def _scale_layer(layer: int, n_layers: int, ref_layers: int) -> int:
    return min(n_layers - 1, max(0, round(layer * n_layers / ref_layers)))


def _scaled(hp: dict[str, Any], n_layers: int, ref_layers: int) -> dict[str, Any]:
    """The family default moved to a model with another depth: layers scaled proportionally."""
    out = dict(hp)
    if n_layers == ref_layers:
        return out
    if isinstance(out.get("layers"), list):
        out["layers"] = sorted({_scale_layer(int(x), n_layers, ref_layers) for x in out["layers"]})
    if isinstance(out.get("layer"), int):
        out["layer"] = _scale_layer(out["layer"], n_layers, ref_layers)
    return out


def load_preset(lm: Any, method: str) -> dict[str, Any]:
    """The preset for ``method`` on this model: family default (scaled to its depth), model-type and named overrides.

    A model named in its family file (e.g. gpt2-xl) gets the values given there; any other model gets
    the family default with layer indices scaled from the reference model (round(l x n / n_ref)) and
    v_loss_layer set to its last block.
    """
    method = _check_method(method)
    data = family_presets(lm.spec.family)
    if method not in data.get("defaults", {}):
        raise UserError(f"The '{lm.spec.family}' presets have no section for {method}.")
    n_layers = int(lm.n_layers)
    hp = _scaled(copy.deepcopy(data["defaults"][method]), n_layers, int(data["reference"]["n_layers"]))
    if "v_loss_layer" in hp:
        hp["v_loss_layer"] = n_layers - 1
    model_type = getattr(getattr(lm.model, "config", None), "model_type", None)
    hp.update(copy.deepcopy(data.get("model_types", {}).get(model_type, {}).get(method, {})))
    named = data.get("models", {}).get(model_key(lm), {})
    if int(named.get("n_layers", n_layers)) == n_layers:
        hp.update(copy.deepcopy(named.get(method, {})))
    return hp


def _kind_error(method: str, key: str, value: Any, kind: str) -> UserError:
    return UserError(f"The {method} hyperparameter '{key}' must be {kind}, not {value!r}.")


def _coerce(method: str, key: str, value: Any, reference: Any) -> Any:
    if isinstance(reference, bool):
        if not isinstance(value, bool):
            raise _kind_error(method, key, value, "true or false")
        return value
    if isinstance(reference, int) or (reference is None and key in LAYER_KEYS):
        if reference is None and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise _kind_error(method, key, value, "a whole number")
        return int(value)
    if isinstance(reference, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _kind_error(method, key, value, "a number")
        if not math.isfinite(value):
            raise _kind_error(method, key, value, "a finite number")
        return float(value)
    if isinstance(reference, str):
        if not isinstance(value, str):
            raise _kind_error(method, key, value, "text")
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(
                f"The {method} hyperparameter '{key}' must be one of {', '.join(CHOICES[key])}, not '{value}'."
            )
        return value
    if isinstance(reference, list):
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in value
        ):
            raise _kind_error(method, key, value, "a list of layer numbers")
        return sorted(set(value))
    return value


def validate_hparams(lm: Any, method: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """Check every key, type and layer index against the preset and the loaded model; return a clean copy.

    The schema is the method's preset section (each key's type is the preset value's type) plus a few
    optional keys; errors are one sentence (unknown key, wrong type, layer out of range, ROME with more
    than one layer...).
    """
    method = _check_method(method)
    editor = _capabilities(method)
    schema: dict[str, Any] = {**copy.deepcopy(dict(editor.optional_hparams)), **load_preset(lm, method)}
    hp = dict(hparams)
    if editor.layers_key == "layer" and "layers" in hp:
        layers = hp.pop("layers")
        layers = [layers] if isinstance(layers, int) else list(layers or [])
        if len(layers) != 1:
            raise UserError(single_layer_message(editor, layers, "were given"))
        hp["layer"] = layers[0]
    out: dict[str, Any] = {}
    for key, value in hp.items():
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise UserError(f"Unknown {method} hyperparameter '{key}'; known ones are: {known}.")
        value = _coerce(method, key, value, schema[key])
        if isinstance(value, float) and not math.isfinite(value):
            raise _kind_error(method, key, value, "a finite number")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise UserError(f"The {method} hyperparameter '{key}' must not be negative, got {value}.")
        if key in AT_LEAST_ONE and value < 1:
            raise UserError(f"The {method} hyperparameter '{key}' must be at least 1, got {value}.")
        if key in LAYER_KEYS and value is not None:
            lm.check_layers([value])
        if key == "layers":
            if not value and not editor.layers_optional:
                raise UserError(f"The {method} hyperparameter 'layers' needs at least one layer.")
            lm.check_layers(value)
        out[key] = value
    for key, default in schema.items():
        out.setdefault(key, copy.deepcopy(default))
    return out


def single_layer_message(editor: Any, layers: Any, given: str) -> str:
    """ "ROME edits exactly one layer, but 2 were given ([4, 5])." for a single-layer editor class."""
    title = editor.title or editor.name.upper()
    return f"{title} edits exactly one layer, but {len(layers)} {given} ({list(layers)})."


def apply_layers(method: str, hparams: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    """Set the layers a method edits under its ``layers_key``: one index for single-layer methods, else a list."""
    method = _check_method(method)
    editor = _capabilities(method)
    hp = dict(hparams)
    layers = sorted({int(x) for x in layers})
    if editor.single_layer and len(layers) != 1:
        raise UserError(single_layer_message(editor, layers, "were given"))
    if editor.layers_key == "layer":
        hp.pop("layers", None)
        hp["layer"] = layers[0]
    else:
        hp.pop("layer", None)
        hp["layers"] = layers
    return hp


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def default_ablation_configs(n_layers: int, single_layer: bool = False) -> list[list[int]]:
    """Layer configurations for an ablation that scale with the model's depth ``n_layers``.

    The rule (fractions of the depth, rounded half up, clipped to the model):
    - single layers at 1/6, 1/3 and 1/2 of the depth (early, the end of MEMIT's range, the middle);
    - around c = n/4, the centre of the MEMIT preset's range scaled to depth (gpt2-medium: layers 4-8 of
      24, c = 6), the pairs (c-1, c) and (c, c+1) and the triple (c-1, c, c+1), shifted inwards at the
      model's edges.
    For 24 layers: 4; 8; 12; 5,6; 6,7; 5,6,7. For a single-layer method (ROME) every layer these name, one
    at a time (24 layers: 4; 5; 6; 7; 8; 12). Configurations are sorted, distinct and ordered by size, then
    by layer.
    """
    n = int(n_layers)
    if n < 1:
        return []

    def window(start: int, size: int) -> tuple[int, ...] | None:
        if size > n:
            return None
        start = min(max(start, 0), n - size)
        return tuple(range(start, start + size))

    singles = {(min(n - 1, _half_up(n * f)),) for f in (1 / 6, 1 / 3, 1 / 2)}
    c = min(n - 1, _half_up(n / 4))
    groups = {w for w in (window(c - 1, 2), window(c, 2), window(c - 1, 3)) if w is not None}
    configs = singles | groups
    if single_layer:
        configs = {(layer,) for cfg in configs for layer in cfg}
    return [list(cfg) for cfg in sorted(configs, key=lambda cfg: (len(cfg), cfg))]


class PresetHparams:
    """Editor mixin: defaults come from the model family's preset file; overrides are validated against them."""

    name: str

    def default_hparams(self, lm: Any) -> dict[str, Any]:
        return load_preset(lm, self.name)

    def resolve_hparams(self, lm: Any, hparams: Any) -> dict[str, Any]:
        """The preset overlaid with ``hparams``, validated (one-sentence UserError on a bad key or value)."""
        return validate_hparams(lm, self.name, {**self.default_hparams(lm), **dict(hparams)})
