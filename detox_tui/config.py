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
    method: str | None = None  # memit | rome | ft | dinm | aura; None = baseline only
    layers: list[int] | None = None
    mode: str = "replace"  # replace | erase
    protocol: str = "per-prompt"  # per-prompt | batch
    hparams: dict = field(default_factory=dict)  # overrides on top of the model's preset
    holdout: str | None = None
    stats_corpus: str = "builtin"
    stats_tokens: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)
