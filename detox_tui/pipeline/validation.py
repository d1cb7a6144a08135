"""One check of an edit or ablation configuration, before anything is generated.

``validate_edit`` checks the method, mode, protocol, layers (against the loaded model's depth),
hyperparameters and prompts, and raises a one-sentence UserError naming the option to fix. It reads only
the configuration, the preset files and the model's depth: no forward pass, so front ends call it before
they start a run and the engine calls it again at the start of ``run_edit`` / ``run_ablation``.
What a method needs comes from its editor's class attributes (detox_tui.backends.editing.base.Capabilities).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from detox_tui.backends.chat import check_chat_template_mode
from detox_tui.backends.editing.base import EDITORS, editor_class
from detox_tui.backends.editing.presets import (
    apply_layers,
    default_ablation_configs,
    load_preset,
    validate_hparams,
)
from detox_tui.backends.editing.rect import check_rect_percent
from detox_tui.config import ExperimentConfig
from detox_tui.errors import UserError
from detox_tui.prompts.base import PromptItem

MODES = ("replace", "erase")
PROTOCOLS = ("per-prompt", "batch")

# How each checked setting is named to the user: the CLI's options by default; the app passes its own words.
# Examples ("e.g. --layers 4") are added only to option names; "configs" is a noun used as "the <configs> entry".
CLI_NAMES: dict[str, str] = {
    "method": "--method",
    "mode": "--mode",
    "erase": "--mode erase",
    "layers": "--layers",
    "configs": "--configs",
    "holdout": "--holdout",
    "batch": "--batch",
    "chat_template": "--chat-template",
    "rect": "--rect",
}


@dataclass(frozen=True)
class ValidatedEdit:
    """A checked configuration: the editor class, the layer sets to edit and their validated hyperparameters.

    ``layer_sets`` is ``[cfg.layers]`` for an edit (None = the preset's layers) and the configurations for
    an ablation (defaults scaled to the model's depth when none were given); ``hparams[i]`` goes with
    ``layer_sets[i]``.
    """

    method: str
    editor: type
    layer_sets: list[list[int] | None]
    hparams: list[dict[str, Any]]

    @property
    def configs(self) -> list[list[int]]:
        return [list(s) for s in self.layer_sets if s is not None]


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _key(layers: Sequence[int]) -> str:
    return ",".join(str(x) for x in layers)


def resolve_hparams(lm: Any, method: str, hparams: Mapping[str, Any], layers: Sequence[int] | None) -> dict:
    """The method's preset for this model, overlaid with ``hparams`` and ``layers``, validated."""
    hp = {**load_preset(lm, method), **dict(hparams or {})}
    if layers is not None:
        hp = apply_layers(method, hp, list(layers))
    return validate_hparams(lm, method, hp)


def _check_layer_set(
    lm: Any, editor: type, layers: Sequence[Any], option: str, in_configs: bool
) -> list[int] | None:
    """Range and count of one layer set; an empty set means "the method's own choice" where it has one."""
    n = int(lm.n_layers)
    is_option = option.startswith("--")
    where = f"the {option} entry '{_key(layers)}'" if in_configs else option
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            hint = (
                f" (leave {option} out for configurations scaled to it)" if in_configs and is_option else ""
            )
            raise UserError(
                f"Layer {layer} in {where} is out of range: {lm.name} has layers 0 to {n - 1}{hint}."
            )
    layers = sorted(set(layers))
    if not layers:
        if editor.layers_optional and not in_configs:
            return None
        raise UserError(f"{where[0].upper() + where[1:]} names no layer; give at least one.")
    if editor.single_layer and len(layers) != 1:
        title = editor.title or editor.name.upper()
        if in_configs:
            fix = "give one layer per entry"
            fix += f", e.g. {option} '{';'.join(str(x) for x in layers)}'" if is_option else ""
            given = f"{where} has {len(layers)}"
        else:
            fix = f"give one, e.g. {option} {layers[0]}" if is_option else "select one"
            given = f"{len(layers)} were given in {where} ({_key(layers)})"
        raise UserError(f"{title} edits exactly one layer, but {given}; {fix}.")
    return layers


def _check_prompts(editor: type, cfg: ExperimentConfig, items: Sequence[PromptItem], names) -> None:
    if not items:
        raise UserError("No prompts are selected; pick at least one prompt.")
    if editor.request_free:
        return
    for item in items:
        if cfg.mode == "replace" and editor.needs_targets and not item.target:
            raise UserError(
                f"The prompt '{_short(item.prompt)}' has no safe target; add a target column "
                f"or use {names['erase']}."
            )
        if item.subject is not None and item.subject not in item.prompt:
            raise UserError(
                f"The subject '{_short(item.subject)}' does not occur in the prompt '{_short(item.prompt)}'."
            )


# Room an edit needs beyond a prompt and its continuation: MEMIT/ROME's context-template prefixes (up to ~10
# tokens). Generation needs none: it keeps the end of a prompt that would not leave room for the new tokens.
_EDIT_ROOM = 16


def _context_length(lm: Any) -> int | None:
    config = getattr(getattr(lm, "model", None), "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_lengths(lm: Any, cfg: ExperimentConfig, items: Sequence[PromptItem]) -> None:
    """A prompt with its target (or toxic continuation) must fit the model's context with room for the edit's
    templates; otherwise the edit's forward passes would fail after the before phase."""
    limit = _context_length(lm)
    tokenizer = getattr(lm, "tokenizer", None)
    if limit is None or tokenizer is None:
        return
    for item in items:
        longest = max(item.target or "", item.toxic or "", key=len)
        n = len(tokenizer(item.prompt + longest)["input_ids"])
        if n + _EDIT_ROOM > limit:
            raise UserError(
                f"The prompt '{_short(item.prompt)}' is {n} tokens long with its continuation; {lm.name} reads at "
                f"most {limit} tokens and an edit needs {_EDIT_ROOM} more for its templates: shorten it."
            )


def validate_edit(
    lm: Any,
    cfg: ExperimentConfig,
    prompts: Sequence[PromptItem],
    holdout: Sequence[PromptItem] = (),
    configs: Sequence[Sequence[int]] | None = None,
    *,
    ablation: bool = False,
    names: Mapping[str, str] | None = None,
) -> ValidatedEdit:
    """Check an edit (``ablation=False``: ``cfg.layers``) or an ablation (``configs``; None = defaults
    scaled to the model's depth) against the loaded model, the method and the prompts; no forward pass.

    Raises a one-sentence UserError naming the option to change (``names`` maps the settings to the
    front end's words: CLI options by default).
    """
    names = {**CLI_NAMES, **(names or {})}
    if not cfg.method:
        raise UserError(f"No editing method was chosen; use {names['method']} {'|'.join(EDITORS)}.")
    method = cfg.method.lower()
    if method not in EDITORS:
        raise UserError(f"Unknown {names['method']} '{cfg.method}'; choose one of: {', '.join(EDITORS)}.")
    editor = editor_class(method)
    if cfg.mode not in MODES:
        raise UserError(f"Unknown {names['mode']} '{cfg.mode}'; use replace or erase.")
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"Unknown edit protocol '{cfg.protocol}'; use per-prompt or batch.")
    check_chat_template_mode(cfg.chat_template, names["chat_template"])
    check_rect_percent(cfg.rect, names["rect"])
    items, held = list(prompts), list(holdout)
    if held and ablation:
        raise UserError(f"{names['holdout']} is not available for an ablation.")
    # A request-free method makes one edit for every prompt, so held-out prompts are covered as in a batch.
    if held and cfg.protocol != "batch" and not editor.request_free:
        raise UserError(
            f"Held-out prompts ({names['holdout']}) need the batch protocol ({names['batch']}): "
            "under per-prompt editing no edit covers them."
        )
    _check_prompts(editor, cfg, items, names)
    _check_lengths(lm, cfg, [*items, *held])
    if ablation:
        if configs is None:
            layer_sets: list[list[int] | None] = list(
                default_ablation_configs(lm.n_layers, single_layer=editor.single_layer)
            )
        else:
            layer_sets = []
            for c in configs:
                layers = _check_layer_set(lm, editor, list(c), names["configs"], True)
                if layers in layer_sets:
                    raise UserError(f"The {names['configs']} entry '{_key(layers)}' is given twice.")
                layer_sets.append(layers)
        if not layer_sets:
            raise UserError(f"No layer configurations were given ({names['configs']} is empty).")
    else:
        layers = cfg.layers
        layer_sets = [
            None if layers is None else _check_layer_set(lm, editor, list(layers), names["layers"], False)
        ]
    hparams = [resolve_hparams(lm, method, cfg.hparams, layers) for layers in layer_sets]
    return ValidatedEdit(method=method, editor=editor, layer_sets=layer_sets, hparams=hparams)


def check_corpora(cfg: ExperimentConfig, *, needs_covariance: bool) -> None:
    """The corpora an edit reads, checked before its run is created: the side effects' neutral corpus and prompts,
    and the statistics corpus when the method needs covariance statistics. A local file (or the builtin one) is
    read in full, so a missing, empty or undecodable file is refused now rather than after the before phase; an
    hf: source is checked for its form and the optional ``datasets`` package (its data is streamed later).
    """
    from detox_tui.prompts import load_corpus, load_neutral_prompts
    from detox_tui.prompts.loaders import parse_hf_source, require_datasets

    def corpus(source: str) -> None:
        if str(source).startswith("hf:"):
            parse_hf_source(str(source))
            require_datasets("corpora")
        else:
            load_corpus(source)

    corpus(cfg.side_effects.neutral_corpus)
    load_neutral_prompts(cfg.side_effects.neutral_prompts)
    if needs_covariance:
        corpus(cfg.stats_corpus)
