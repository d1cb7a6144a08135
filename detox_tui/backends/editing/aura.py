"""AurA (Suau et al. 2024): dampen each MLP unit in proportion to how well it separates toxic text."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from detox_tui.backends.editing.base import Capabilities, EditContext, EditDelta, EditRequest, delta_checksum
from detox_tui.backends.editing.presets import CHOICES, PresetHparams, load_preset
from detox_tui.backends.models import linear_weight_out_in, to_param_layout
from detox_tui.errors import UserError
from detox_tui.events import EventCallback, Progress, check_cancel, null_callback

log = logging.getLogger(__name__)

# Keys AurA accepts beyond its preset section (pooling, modules, max_sentences), with their defaults.
POOLINGS = ("max", "mean")
MODULE_CHOICES = ("both", "mlp_in", "mlp_out")
# What an MLP hidden unit is (the "mlp_in" side of ``modules``):
# - "neuron": the out-projection's input, act(gate_proj(x)) * up_proj(x) on a gated MLP (Llama, Qwen, Mistral,
#   Gemma), act(c_fc(x)) on GPT-2; dampened by scaling the out-projection's input columns.
# - "gate": the in-projection's output before the activation (gate_proj on a gated MLP, c_fc on GPT-2, the hook
#   point of the AurA reference on GPT-2); dampened by scaling the in-projection's rows and bias. On a gated MLP
#   act(alpha g) * u is not alpha act(g) * u, so this is not the neuron.
UNITS = CHOICES["unit"]
# A unit key naming a module's input rather than its output: "<out-projection path>:input".
INPUT_SUFFIX = ":input"


def _is_input(key: str) -> bool:
    return key.endswith(INPUT_SUFFIX)


def _module_path(key: str) -> str:
    return key[: -len(INPUT_SUFFIX)] if _is_input(key) else key


def default_unit(lm: Any) -> str:
    """The hidden unit the model family's AurA preset names (``neuron`` when the preset says nothing)."""
    return str(load_preset(lm, "aura").get("unit", "neuron"))


def unit_modules(lm: Any, modules: str = "both", unit: str | None = None) -> list[str]:
    """Unit keys AurA scores per layer: the MLP's hidden units (as ``unit`` says) and/or its out-projection's outputs.

    A key is a module path (the module's output features) or ``<path>:input`` (its input features, the neuron).
    ``unit`` None = the family preset's.
    """
    if modules not in MODULE_CHOICES:
        raise UserError(f"Unknown AurA modules '{modules}'; use both, mlp_in or mlp_out.")
    unit = default_unit(lm) if unit is None else unit
    if unit not in UNITS:
        raise UserError(f"Unknown AurA unit '{unit}'; use {' or '.join(UNITS)}.")
    paths = []
    for layer in range(lm.n_layers):
        if modules in ("both", "mlp_in"):
            if unit == "neuron":
                paths.append(lm.spec.mlp_out_path(layer) + INPUT_SUFFIX)
            else:
                paths.append(lm.spec.mlp_in_path(layer))
        if modules in ("both", "mlp_out"):
            paths.append(lm.spec.mlp_out_path(layer))
    return paths


def _layer_of(lm: Any, path: str) -> int:
    prefix = lm.spec.blocks + "."
    return int(path[len(prefix) :].split(".", 1)[0])


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUROC of every column of ``scores`` [n, units] for binary ``labels`` [n] (True = positive).

    Mann-Whitney U from tie-aware average ranks, vectorised over units: U / (n_pos x n_neg).
    """
    labels = labels.to(device=scores.device, dtype=torch.bool)
    n_pos = int(labels.sum())
    n_neg = int(labels.numel() - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise UserError("AUROC needs at least one toxic and one non-toxic sentence.")
    s = scores.to(torch.float64).T.contiguous()  # [units, n]
    sorted_s = s.sort(dim=1).values
    below = torch.searchsorted(sorted_s, s, side="left")
    through = torch.searchsorted(sorted_s, s, side="right")
    ranks = (below + through + 1).to(torch.float64) / 2.0  # mean of the 1-based ranks below+1 .. through
    rank_sum = ranks[:, labels].sum(dim=1)
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return (u / (n_pos * n_neg)).to(torch.float32)


def alphas_from_auroc(auroc_values: torch.Tensor) -> torch.Tensor:
    """AurA's dampening factor: 2 (1 - AUROC) = 1 - Gini where AUROC > 0.5, else exactly 1."""
    a = auroc_values.to(torch.float32)
    return torch.where(a > 0.5, 2.0 * (1.0 - a), torch.ones_like(a))


def _pool(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    h = h.float()
    m = mask.unsqueeze(-1)
    if pooling == "max":
        return h.masked_fill(~m, float("-inf")).amax(dim=1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def compute_expertise(
    lm: Any,
    toxic: Sequence[str],
    nontoxic: Sequence[str],
    *,
    pooling: str = "max",
    modules: str = "both",
    unit: str | None = None,
    batch_size: int = 16,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
) -> dict[str, torch.Tensor]:
    """Each unit's AUROC for toxic (positive) vs non-toxic sentences: {unit key: [units] tensor}.

    A unit is one hidden unit of the MLP (``unit``: the neuron = the out-projection's input, or the gate =
    the in-projection's pre-activation output; None = the family preset's) or one output feature of the
    out-projection; its responses are pooled over each sentence's non-padding tokens (``max`` or ``mean``).
    """
    if pooling not in POOLINGS:
        raise UserError(f"Unknown AurA pooling '{pooling}'; use max or mean.")
    if not toxic or not nontoxic:
        raise UserError("AurA needs at least one toxic and one non-toxic sentence.")
    paths = unit_modules(lm, modules, unit)
    sentences = list(toxic) + list(nontoxic)
    labels = torch.tensor([True] * len(toxic) + [False] * len(nontoxic))
    pooled: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    current_mask: list[torch.Tensor] = []

    def recorder(path: str) -> Callable:
        def hook(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            pooled[path].append(_pool(h.detach(), current_mask[0], pooling).cpu())

        return hook

    def input_recorder(path: str) -> Callable:
        def hook(_m, inputs):
            pooled[path].append(_pool(inputs[0].detach(), current_mask[0], pooling).cpu())

        return hook

    handles = [
        lm.module(_module_path(p)).register_forward_pre_hook(input_recorder(p))
        if _is_input(p)
        else lm.module(p).register_forward_hook(recorder(p))
        for p in paths
    ]
    tok = lm.tokenizer
    n_batches = (len(sentences) + batch_size - 1) // batch_size
    emit(
        Progress("aura expertise", 0, n_batches, f"{len(toxic)} toxic + {len(nontoxic)} non-toxic sentences")
    )
    try:
        with torch.no_grad():
            for b, start in enumerate(range(0, len(sentences), batch_size)):
                check_cancel(cancel)
                enc = tok(
                    sentences[start : start + batch_size], return_tensors="pt", padding=True, truncation=True
                )
                mask = enc["attention_mask"].to(lm.device)
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
                current_mask[:] = [mask.bool()]
                lm.model(
                    input_ids=enc["input_ids"].to(lm.device), attention_mask=mask, position_ids=positions
                )
                emit(Progress("aura expertise", b + 1, n_batches))
    finally:
        for h in handles:
            h.remove()
    return {
        p: auroc(torch.cat(chunks).to(lm.device), labels.to(lm.device)).cpu() for p, chunks in pooled.items()
    }


class AuraHooks:
    """Context manager: multiply each unit by its alpha with forward (pre-)hooks (no weight change)."""

    def __init__(self, lm: Any, alphas: Mapping[str, torch.Tensor]) -> None:
        self.lm = lm
        self.alphas = dict(alphas)
        self._handles: list[Any] = []

    def __enter__(self) -> AuraHooks:
        for key, alpha in self.alphas.items():
            module = self.lm.module(_module_path(key))
            if _is_input(key):
                self._handles.append(module.register_forward_pre_hook(self._make_input_hook(alpha)))
            else:
                self._handles.append(module.register_forward_hook(self._make_hook(alpha)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @staticmethod
    def _make_hook(alpha: torch.Tensor) -> Callable:
        def hook(_m, _i, out):
            if isinstance(out, tuple):
                return (out[0] * alpha.to(out[0].device, out[0].dtype), *out[1:])
            return out * alpha.to(out.device, out.dtype)

        return hook

    @staticmethod
    def _make_input_hook(alpha: torch.Tensor) -> Callable:
        def hook(_m, inputs):
            x = inputs[0]
            return (x * alpha.to(x.device, x.dtype), *inputs[1:])

        return hook


def fold_alphas(lm: Any, alphas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight deltas (param layout) equal to the hooks: an output unit scales its weight row (out, in layout)
    and bias by alpha; an input unit (the neuron) scales its weight column, never the bias. A module with both
    gets W' = diag(a_out) W diag(a_in)."""
    scales: dict[str, dict[str, torch.Tensor]] = {}
    for key, alpha in alphas.items():
        if bool((alpha == 1).all()):
            continue
        scales.setdefault(_module_path(key), {})["in" if _is_input(key) else "out"] = alpha
    deltas: dict[str, torch.Tensor] = {}
    for path, by_side in scales.items():
        module = lm.module(path)
        w = linear_weight_out_in(module, lm.spec).detach().float()
        scaled = w
        if "out" in by_side:
            scaled = scaled * by_side["out"].to(w.device, torch.float32).unsqueeze(1)
        if "in" in by_side:
            scaled = scaled * by_side["in"].to(w.device, torch.float32).unsqueeze(0)
        deltas[f"{path}.weight"] = to_param_layout(scaled - w, lm.spec).cpu()
        bias = getattr(module, "bias", None)
        if bias is not None and "out" in by_side:
            a = by_side["out"].to(bias.device, torch.float32)
            b = bias.detach().float()
            deltas[f"{path}.bias"] = (b * a - b).cpu()
    return deltas


# ---------------------------------------------------------------- sentence sets


def _builtin_lines(name: str) -> list[str]:
    try:
        text = resources.files("detox_tui.data").joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UserError(
            f"The builtin AurA sentence file '{name}' is missing from this installation."
        ) from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def _cap(lines: list[str], limit: int) -> list[str]:
    if len(lines) <= limit:
        return lines
    return random.Random(0).sample(lines, limit)


def read_jigsaw_csv(path: str | Path) -> tuple[list[str], list[str]]:
    """Toxic and non-toxic sentences from a Jigsaw-format CSV (``comment_text``, ``toxic`` >= 0.5)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The AurA sentence file '{path}' does not exist.")
    toxic, nontoxic = [], []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if "comment_text" not in fields or "toxic" not in fields:
                raise UserError(
                    f"'{path}' needs the Jigsaw columns 'comment_text' and 'toxic'; it has {fields}."
                )
            for row in reader:
                text = (row.get("comment_text") or "").strip()
                try:
                    label = float(row.get("toxic") or "")
                except ValueError as exc:
                    raise UserError(
                        f"'{path}' line {reader.line_num}: the 'toxic' value {row.get('toxic')!r} is not a number."
                    ) from exc
                if text:
                    (toxic if label >= 0.5 else nontoxic).append(text)
    except UnicodeDecodeError as exc:
        raise UserError(f"'{path}' is not a UTF-8 text file.") from exc
    return toxic, nontoxic


def _read_hf(spec: str, limit: int) -> tuple[list[str], list[str]]:
    """``hf:<dataset>[:<split>]`` with a text column (comment_text/text) and a toxicity label."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise UserError(
            "Loading AurA sentences from 'hf:' needs the datasets extra: pip install 'detox-tui[data]'."
        ) from exc
    name, _, split = spec[3:].partition(":")
    try:
        ds = load_dataset(name, split=split or "train", streaming=True)
    except Exception as exc:  # datasets raises many error types for missing or private sets
        raise UserError(f"Could not load the dataset '{name}' for AurA: {str(exc).splitlines()[0]}") from exc
    toxic, nontoxic = [], []
    for row in ds:
        text = row.get("comment_text") or row.get("text")
        label = next((row[k] for k in ("toxic", "toxicity", "label") if k in row), None)
        if text is None or label is None:
            raise UserError(
                f"The dataset '{name}' needs a comment_text/text column and a toxic/toxicity/label column."
            )
        (toxic if float(label) >= 0.5 else nontoxic).append(str(text).strip())
        if len(toxic) >= limit and len(nontoxic) >= limit:
            break
    return toxic, nontoxic


def load_sentence_sets(source: str, max_sentences: int) -> tuple[list[str], list[str]]:
    """Toxic and non-toxic sentences from "builtin", a Jigsaw CSV path or "hf:<dataset>[:split]"."""
    if source == "builtin":
        toxic, nontoxic = _builtin_lines("toxic_sentences.txt"), _builtin_lines("nontoxic_sentences.txt")
    elif source.startswith("hf:"):
        toxic, nontoxic = _read_hf(source, max_sentences)
    else:
        toxic, nontoxic = read_jigsaw_csv(source)
    if not toxic or not nontoxic:
        raise UserError(f"The AurA sentence source '{source}' needs both toxic and non-toxic sentences.")
    return _cap(toxic, max_sentences), _cap(nontoxic, max_sentences)


# ---------------------------------------------------------------- cache


def expertise_cache_key(
    lm: Any, toxic: Sequence[str], nontoxic: Sequence[str], pooling: str, modules: str, unit: str = "gate"
) -> str:
    digest = hashlib.sha256()
    for group in (toxic, nontoxic):
        for s in group:
            digest.update(s.encode("utf-8") + b"\0")
        digest.update(b"\1")
    key = {"model": lm.identity(), "sentences": digest.hexdigest(), "pooling": pooling, "modules": modules}
    if unit != "gate":  # the keys written before units were a choice stay valid for the gate
        key["unit"] = unit
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# The cache file's header format: it carries the model's identity, the settings and a checksum over the header and
# every tensor. Files without it (written before) or failing any check are recomputed, never used.
AURA_CACHE_FORMAT = "detox-tui-aura-expertise/2"


def _expected_units(lm: Any, key: str) -> int:
    """How many units ``key`` has on this model: the module's input features (the neuron) or its output features."""
    out_features, in_features = linear_weight_out_in(lm.module(_module_path(key)), lm.spec).shape
    return int(in_features if _is_input(key) else out_features)


def _cache_header(lm: Any, pooling: str, modules: str, unit: str) -> str:
    return json.dumps(
        {
            "format": AURA_CACHE_FORMAT,
            "model": lm.identity(),
            "pooling": pooling,
            "modules": modules,
            "unit": unit,
        },
        sort_keys=True,
    )


def _expertise_problem(lm: Any, expertise: Mapping[str, torch.Tensor], keys: Sequence[str]) -> str | None:
    """What makes ``expertise`` unusable on this model (other modules, a wrong shape, non-finite or non-AUROC
    values), or None."""
    if set(expertise) != set(keys):
        return "it scores other modules than this model's"
    for key in keys:
        t = expertise[key]
        n = _expected_units(lm, key)
        if t.dim() != 1 or t.shape[0] != n:
            return f"'{key}' has shape {tuple(t.shape)}, not ({n},)"
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            return f"'{key}' has NaN or infinite values"
        if bool(((t < 0) | (t > 1)).any()):
            return f"'{key}' has values outside 0..1 (not AUROCs)"
    return None


def read_expertise_cache(
    lm: Any, path: Path, header: str, keys: Sequence[str]
) -> dict[str, torch.Tensor] | None:
    """The cached expertise at ``path`` when it passes every check (header, checksum, modules, shapes, finite
    values); None when there is none. A file that fails a check is not used: one warning names it and why."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            expertise = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # safetensors raises its own error types for damaged files
        log.debug("reading %s failed", path, exc_info=True)
        problem: str | None = "it is damaged or truncated"
    else:
        if meta.get("detox_tui") != header:
            problem = "it was written for another model, setting or format"
        elif meta.get("checksum") != delta_checksum(header, expertise):
            problem = "it failed its checksum"
        else:
            problem = _expertise_problem(lm, expertise, keys)
    if problem:
        log.warning("not using the AurA expertise cache %s (%s); recomputing it", path, problem)
        return None
    return expertise


def cached_expertise(
    lm: Any,
    toxic: Sequence[str],
    nontoxic: Sequence[str],
    cache_dir: Path,
    *,
    pooling: str = "max",
    modules: str = "both",
    unit: str | None = None,
    batch_size: int = 16,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """``compute_expertise`` behind a checksummed safetensors cache in ``cache_dir/aura``; returns (expertise, hit).

    A cache file is used only when its header (model identity, pooling, modules, unit), checksum, modules, shapes and
    values all check out against ``lm``; otherwise it is recomputed (with a warning) and rewritten atomically.
    """
    from safetensors.torch import save_file

    unit = default_unit(lm) if unit is None else unit
    folder = Path(cache_dir) / "aura"
    path = folder / f"{expertise_cache_key(lm, toxic, nontoxic, pooling, modules, unit)}.safetensors"
    header = _cache_header(lm, pooling, modules, unit)
    keys = unit_modules(lm, modules, unit)
    cached = read_expertise_cache(lm, path, header, keys)
    if cached is not None:
        log.info("AurA expertise cache hit: %s", path)
        return cached, True
    expertise = compute_expertise(
        lm,
        toxic,
        nontoxic,
        pooling=pooling,
        modules=modules,
        unit=unit,
        batch_size=batch_size,
        emit=emit,
        cancel=cancel,
    )
    tensors = {k: v.contiguous() for k, v in expertise.items()}
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"detox_tui": header, "checksum": delta_checksum(header, tensors)})
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        log.warning(
            "could not cache the AurA expertise in %s (%s); it is used for this run only",
            folder,
            exc.strerror or exc,
        )
    return expertise, False


# ---------------------------------------------------------------- editor


class AuraEditor(PresetHparams, Capabilities):
    """AurA: request-free; every unit with AUROC > 0.5 is scaled by 2 (1 - AUROC), folded into the weights.

    hparams: pooling (max | mean), modules (both | mlp_in | mlp_out), unit (neuron | gate: what an MLP hidden
    unit is, see UNITS; the neuron by default, the gate on GPT-2-style presets), max_sentences per class, sentences
    ("builtin", a Jigsaw CSV path or "hf:<dataset>[:split]"; ctx.extra["toxic_sentences"] /
    ["nontoxic_sentences"] win when given), batch_size, layers (empty = all). The expertise is computed
    for every layer once and cached, so restricting ``layers`` (an ablation sweep) reuses it.
    """

    name = "aura"
    title = "AurA"
    # An empty list dampens every layer; a list restricts the edit (layer pickers, ablations).
    layers_key = "layers"
    layers_optional = True
    request_free = True
    needs_targets = False
    optional_hparams = {"layers": [], "unit": "neuron"}
    convergence_advice = (
        "more or other toxic/non-toxic sentences (the sentences hyperparameter) or more layers"
    )

    def probe_sets(
        self, lm: Any, hparams: Mapping[str, Any], ctx: EditContext, limit: int = 32
    ) -> tuple[list[str], list[str]]:
        """Toxic and non-toxic sentences to check the edit on (the first ``limit`` of the sets it uses)."""
        if "toxic_sentences" in ctx.extra or "nontoxic_sentences" in ctx.extra:
            toxic = [s for s in ctx.extra.get("toxic_sentences") or [] if s.strip()]
            nontoxic = [s for s in ctx.extra.get("nontoxic_sentences") or [] if s.strip()]
        else:
            hp = self.resolve_hparams(lm, hparams)
            toxic, nontoxic = load_sentence_sets(str(hp["sentences"]), int(hp["max_sentences"]))
        return toxic[:limit], nontoxic[:limit]

    def compute(
        self,
        lm: Any,
        requests: Sequence[EditRequest],
        hparams: Mapping[str, Any],
        ctx: EditContext,
    ) -> EditDelta:
        hp = self.resolve_hparams(lm, hparams)
        pooling, modules, unit = str(hp["pooling"]), str(hp["modules"]), str(hp["unit"])
        max_sentences = int(hp["max_sentences"])
        # An empty "layers" dampens every layer; a list restricts the edit (layer pickers, ablations).
        only_layers = set(lm.check_layers(list(hp.get("layers") or [])))
        if "toxic_sentences" in ctx.extra or "nontoxic_sentences" in ctx.extra:
            toxic = _cap([s for s in ctx.extra.get("toxic_sentences") or [] if s.strip()], max_sentences)
            nontoxic = _cap(
                [s for s in ctx.extra.get("nontoxic_sentences") or [] if s.strip()], max_sentences
            )
            source = "context"
        else:
            source = str(hp["sentences"])
            toxic, nontoxic = load_sentence_sets(source, max_sentences)
        cache_dir = ctx.cache_dir
        if cache_dir is None:
            from detox_tui.config import Paths

            cache_dir = Paths.resolve().cache_dir
        expertise, hit = cached_expertise(
            lm,
            toxic,
            nontoxic,
            cache_dir,
            pooling=pooling,
            modules=modules,
            unit=unit,
            batch_size=int(hp["batch_size"]),
            emit=ctx.emit,
            cancel=ctx.cancel,
        )
        check_cancel(ctx.cancel)
        alphas = {
            path: alphas_from_auroc(a)
            for path, a in expertise.items()
            if not only_layers or _layer_of(lm, path) in only_layers
        }
        per_layer: dict[str, dict[str, int]] = {}
        for path, alpha in alphas.items():
            n = int((alpha < 1).sum())
            kind = "mlp_out" if path == lm.spec.mlp_out_path(_layer_of(lm, path)) else "mlp_in"
            per_layer.setdefault(str(_layer_of(lm, path)), {})[kind] = n
        layers = sorted({_layer_of(lm, p) for p, a in alphas.items() if bool((a < 1).any())})
        n_dampened = sum(int((a < 1).sum()) for a in alphas.values())
        log.info("AurA dampens %d units over %d layers", n_dampened, len(layers))
        return EditDelta(
            deltas=fold_alphas(lm, alphas),
            method=self.name,
            model_name=lm.name,
            layers=layers,
            hparams=dict(hp),
            requests=[r.to_dict() for r in requests],
            info={
                "n_dampened": n_dampened,
                "per_layer": per_layer,
                "n_toxic": len(toxic),
                "n_nontoxic": len(nontoxic),
                "sentences": source,
                "cache_hit": hit,
                "requests_ignored": True,
                "note": "AurA is request-free: it dampens units that separate toxic from non-toxic text.",
            },
        )
