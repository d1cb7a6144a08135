"""Typed settings and platform paths (data, cache, config) for detox-tui."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import platformdirs

APP_NAME = "detox-tui"
DEFAULT_MODEL = "gpt2-medium"
DEFAULT_SCORER = "detoxify"


@dataclass(frozen=True)
class Paths:
    """Where detox-tui keeps its run store (data) and its caches (statistics, templates, expertise)."""

    data_dir: Path
    cache_dir: Path

    @property
    def store_path(self) -> Path:
        return self.data_dir / "runs.sqlite"

    @property
    def stats_dir(self) -> Path:
        return self.cache_dir / "stats"

    @classmethod
    def resolve(cls, data_dir: str | os.PathLike | None = None) -> Paths:
        """--data-dir beats DETOX_TUI_HOME beats the platformdirs defaults.

        With an explicit data dir or DETOX_TUI_HOME, the cache lives beside it (``<home>/cache``) so one
        folder holds everything; otherwise platformdirs' user cache dir is used.
        """
        home = data_dir or os.environ.get("DETOX_TUI_HOME")
        if home:
            root = Path(home).expanduser()
            return cls(data_dir=root, cache_dir=root / "cache")
        return cls(
            data_dir=Path(platformdirs.user_data_dir(APP_NAME)),
            cache_dir=Path(platformdirs.user_cache_dir(APP_NAME)),
        )


@dataclass
class GenerationConfig:
    """How continuations are sampled: k seeded samples per prompt (plus an optional greedy one)."""

    samples: int = 5
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    greedy: bool = False  # add one greedy continuation per prompt (scored separately, sample index -1)
    seed: int = 0
    batch_size: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScoringConfig:
    """How generations are scored: continuation-only unless score_with_prompt is set."""

    scorer: str = DEFAULT_SCORER
    threshold: float = 0.1
    score_with_prompt: bool = False
    batch_size: int = 32
    # Let a scorer checkpoint that needs pickle (which can run code) load, with a warning; off: it is refused.
    trust_checkpoint: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SideEffectConfig:
    """Side effects measured on every edit run."""

    neutral_corpus: str = "builtin"  # "builtin", a local text file, or "hf:<dataset>"
    neutral_prompts: str = "builtin"
    collapse_factor: float = 2.0
    max_tokens: int = 4096

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VerdictConfig:
    """When a prompt counts as detoxified (see detox_tui.pipeline.verdicts) and how generations are judged."""

    min_reduction: float = 0.1  # on the scorer's 0-1 scale
    alpha: float = 0.05  # one-sided paired test over the prompt's samples
    ppl_model: str | None = (
        None  # reference model for the generations' conditional perplexity ("self" = ours)
    )

    def to_dict(self) -> dict:
        return asdict(self)


# Evaluation protocols from the literature, as data: the generation and scoring settings they fix.
# rtp: RealToxicityPrompts (Gehman et al. 2020), as used by DExperts (Liu et al. 2021) and later work:
# 25 samples of 20 new tokens, nucleus sampling p = 0.9 at temperature 1, the continuation alone scored.
EVAL_PROTOCOLS: dict[str, dict[str, dict[str, object]]] = {
    "rtp": {
        "generation": {"samples": 25, "max_new_tokens": 20, "top_p": 0.9, "temperature": 1.0, "top_k": 0},
        "scoring": {"score_with_prompt": False},
    },
}


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExperimentConfig:
    """Everything that defines one run; stored verbatim in the run store."""

    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    side_effects: SideEffectConfig = field(default_factory=SideEffectConfig)
    prompts: str = "builtin"
    # "auto": wrap each prompt in the tokenizer's chat template (one user turn + the generation prompt) when it has
    # one; "none": raw prompts. See detox_tui.backends.chat.
    chat_template: str = "auto"
    method: str | None = None  # memit | alphaedit | rome | ft | dinm | aura; None = baseline only
    layers: list[int] | None = None
    mode: str = "replace"  # replace | erase
    protocol: str = "per-prompt"  # per-prompt | batch
    hparams: dict = field(default_factory=dict)  # overrides on top of the model's preset
    holdout: str | None = None
    stats_corpus: str = "builtin"
    stats_tokens: int | None = None
    stats_device: str = "auto"  # where covariance statistics accumulate: auto (the model's device) | cpu
    # RECT (Gu et al. 2024): keep this percentage of each edited parameter's entries, those with the largest
    # relative change |dW| / |W|, and zero the rest; None = off. Applies to any method's delta.
    rect: float | None = None
    verdict: VerdictConfig = field(default_factory=VerdictConfig)
    eval_protocol: str | None = None  # a key of EVAL_PROTOCOLS, applied with apply_eval_protocol

    def apply_eval_protocol(self, name: str | None) -> ExperimentConfig:
        """Set the generation and scoring settings an evaluation protocol fixes (e.g. "rtp")."""
        if name is None:
            return self
        if name not in EVAL_PROTOCOLS:
            from detox_tui.errors import UserError

            raise UserError(
                f"Unknown evaluation protocol '{name}'; choose one of: {', '.join(EVAL_PROTOCOLS)}."
            )
        for section, values in EVAL_PROTOCOLS[name].items():
            target = getattr(self, section)
            for key, value in values.items():
                setattr(target, key, value)
        self.eval_protocol = name
        return self

    def to_dict(self) -> dict:
        return asdict(self)
