"""Sweeps: a grid of edit experiments (models x methods x layer configurations x hyperparameter values), each from
the original weights, run in order in this process (``LocalBackend``) or spread over Ray actors
(``detox_tui.pipeline.sweep_ray.RayBackend``).

The driver (``run_sweep``) is the only writer of the run store. A sweep is a run of kind "sweep" whose config holds
the grid and the expanded experiment list (stored before anything runs) and whose table "sweep" has one row per
experiment, rewritten as it changes state (pending, running, finished, failed, cancelled). A finished experiment is
also a run of its own (kind "edit", as ``detox-tui edit`` would store it), imported from the worker's results; its
sweep row carries that run's id and the headline numbers of an ablation row, so the sweep exports and charts like an
ablation.

Workers (``SweepWorker``) load a model once and run experiments from its original weights (every edit is applied
inside ``EditDelta.applied_to``, which restores the weights bit-exactly), writing only to a private scratch store
whose runs they hand back as plain data. The before phase, the side effects' reference and the covariance statistics
depend on the model, prompts and settings alone, so they are computed once per model (``prepare``) before the
experiments fan out, and shared.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

from detox_tui.config import ExperimentConfig, Paths
from detox_tui.errors import Cancelled, UserError
from detox_tui.events import check_cancel
from detox_tui.pipeline.store import RunStore
from detox_tui.prompts.base import PromptItem

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

log = logging.getLogger(__name__)

STATES = ("pending", "running", "finished", "failed", "cancelled")
# A worker process that dies (a lost Ray actor) costs its experiment one attempt; it runs again once elsewhere.
MAX_ATTEMPTS = 2

# Grid keys: the axes (lists), then settings shared by every experiment.
AXES = ("models", "methods", "layers", "hparams")
SETTINGS = (
    "prompts",
    "limit",
    "holdout",
    "scorer",
    "threshold",
    "protocol",
    "mode",
    "chat_template",
    "stats_corpus",
    "stats_tokens",
    "stats_device",
    "rect",
    "eval_protocol",
    "device",
    "dtype",
)
SECTIONS = ("generation", "scoring", "side_effects", "verdict")


# ------------------------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Experiment:
    """One cell of the grid: a model, a method, a layer configuration (None: the method's preset) and hyperparameters."""

    id: str
    label: str
    model: str
    method: str
    layers: tuple[int, ...] | None
    hparams: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "model": self.model,
            "method": self.method,
            "layers": list(self.layers) if self.layers is not None else None,
            "hparams": dict(self.hparams),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Experiment:
        layers = d.get("layers")
        return cls(
            id=str(d["id"]),
            label=str(d["label"]),
            model=str(d["model"]),
            method=str(d["method"]),
            layers=tuple(int(x) for x in layers) if layers is not None else None,
            hparams=dict(d.get("hparams") or {}),
        )


@dataclass
class Grid:
    """A parsed grid file: the settings every experiment shares and the expanded experiments, in order."""

    source: dict[str, Any]
    settings: dict[str, Any]
    experiments: list[Experiment]
    path: str = ""

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(e.model for e in self.experiments))

    def base_config(self) -> ExperimentConfig:
        """The ExperimentConfig every experiment starts from (model, method, layers and hparams set per experiment)."""
        return base_config(self.settings)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "settings": self.settings, "path": self.path}


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_grid_file(path: str | Path) -> dict[str, Any]:
    """The grid file's contents (TOML by default; YAML for .yaml/.yml, which needs PyYAML)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"The grid file '{path}' does not exist.")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read the grid file '{path}': {exc}.") from exc
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise UserError(
                "YAML grid files need PyYAML (pip install pyyaml); or write the grid in TOML."
            ) from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"The grid file '{path}' is not valid YAML: {str(exc).splitlines()[0]}.") from exc
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"The grid file '{path}' is not valid TOML: {exc}.") from exc
    if not isinstance(data, dict):
        raise UserError(f"The grid file '{path}' must hold a table of settings, not {type(data).__name__}.")
    return data


def _as_list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, int, float, bool)):
        return [value]
    raise UserError(f"The grid's '{key}' must be a value or a list of values.")


def _layer_config(value: Any) -> tuple[int, ...] | None:
    """ "preset" -> None (the method's preset layers); "4,5" / [4, 5] / 4 -> (4, 5)."""
    if isinstance(value, str) and value.strip().lower() in ("preset", "default", ""):
        return None
    try:
        if isinstance(value, str):
            parts = [int(x) for x in value.replace(";", ",").split(",") if x.strip()]
        elif isinstance(value, bool):
            raise ValueError
        elif isinstance(value, int):
            parts = [value]
        elif isinstance(value, (list, tuple)) and not any(isinstance(x, bool) for x in value):
            parts = [int(x) for x in value]
        else:
            raise ValueError
    except (TypeError, ValueError) as exc:
        raise UserError(
            f'Bad layer configuration {value!r} in the grid: use e.g. "4,5", [4, 5] or "preset".'
        ) from exc
    if not parts:
        raise UserError(f"Bad layer configuration {value!r} in the grid: it names no layers.")
    return tuple(sorted(set(parts)))


def _fmt(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def expand_grid(data: Mapping[str, Any], path: str = "") -> Grid:
    """Check a grid's keys and expand its axes into experiments (models x methods x layers x hparam values)."""
    from detox_tui.backends.editing.base import EDITORS

    known = set(AXES) | set(SETTINGS) | set(SECTIONS)
    for key in data:
        if key not in known:
            raise UserError(f"Unknown grid key '{key}'{_suggest(key, known)}.")
    models = [str(m) for m in _as_list(data.get("models", data.get("model")), "models")]
    if not models:
        raise UserError('The grid names no models; e.g. models = ["demo"] or ["gpt2-medium"].')
    methods = [str(m).lower() for m in _as_list(data.get("methods"), "methods")]
    if not methods:
        raise UserError('The grid names no methods; e.g. methods = ["memit", "alphaedit"].')
    for m in methods:
        if m not in EDITORS:
            raise UserError(
                f"Unknown method '{m}' in the grid{_suggest(m, EDITORS)}; choose from {', '.join(EDITORS)}."
            )
    layer_values = data.get("layers", ["preset"])
    layer_list = layer_values if isinstance(layer_values, list) else [layer_values]
    # A list of integers is a list of one-layer configurations: layers = [1, 2] -> L1 and L2.
    layer_sets = [_layer_config(v) for v in layer_list] or [None]
    hp_table = data.get("hparams") or {}
    if not isinstance(hp_table, Mapping):
        raise UserError(
            "The grid's 'hparams' must be a table per method, e.g. [hparams.memit] v_lr = [0.1, 0.5]."
        )
    for m, table in hp_table.items():
        if m not in methods:
            raise UserError(
                f"The grid sets hyperparameters for '{m}', which is not in its methods ({', '.join(methods)})."
            )
        if not isinstance(table, Mapping):
            raise UserError(f"The grid's [hparams.{m}] must be a table of names and values.")
    for section in SECTIONS:
        if section in data and not isinstance(data[section], Mapping):
            raise UserError(f"The grid's '{section}' must be a table.")

    vary_model, vary_method, vary_layers = len(models) > 1, len(methods) > 1, len(layer_sets) > 1
    experiments: list[Experiment] = []
    for model in models:
        for method in methods:
            table = dict(hp_table.get(method) or {})
            names = list(table)
            value_lists = [_as_list(table[n], f"hparams.{method}.{n}") for n in names]
            varying = [n for n, vals in zip(names, value_lists) if len(vals) > 1]
            for layers in layer_sets:
                for combo in itertools.product(*value_lists):
                    hparams = dict(zip(names, combo))
                    parts = []
                    if vary_model:
                        parts.append(model)
                    if vary_method or not (vary_model or vary_layers or varying):
                        parts.append(method)
                    if vary_layers or not parts:
                        parts.append("L" + (",".join(map(str, layers)) if layers is not None else "preset"))
                    parts.extend(f"{n}={_fmt(hparams[n])}" for n in varying)
                    experiments.append(
                        Experiment(
                            id=f"e{len(experiments):03d}",
                            label=" ".join(parts),
                            model=model,
                            method=method,
                            layers=layers,
                            hparams=hparams,
                        )
                    )
    settings = {k: data[k] for k in (*SETTINGS, *SECTIONS) if k in data}
    base_config(settings)  # settings checked now, before anything runs
    return Grid(source=dict(data), settings=settings, experiments=experiments, path=str(path))


def load_grid(path: str | Path) -> Grid:
    return expand_grid(read_grid_file(path), str(path))


def base_config(settings: Mapping[str, Any]) -> ExperimentConfig:
    """The shared settings of a grid as an ExperimentConfig; unknown or mistyped fields are one-line errors."""
    cfg = ExperimentConfig()
    for section in SECTIONS:
        values = settings.get(section) or {}
        target = getattr(cfg, section)
        names = {f.name: f for f in fields(target)}
        for key, value in values.items():
            if key not in names:
                raise UserError(f"Unknown setting '{section}.{key}' in the grid{_suggest(key, names)}.")
            setattr(target, key, _typed(value, getattr(target, key), f"{section}.{key}"))
    simple = {
        "scorer": ("scoring", "scorer"),
        "threshold": ("scoring", "threshold"),
        "device": ("model", "device"),
        "dtype": ("model", "dtype"),
    }
    for key, (section, name) in simple.items():
        if key in settings:
            target = getattr(cfg, section)
            setattr(target, name, _typed(settings[key], getattr(target, name), key))
    for key in ("prompts", "holdout", "protocol", "mode", "chat_template", "stats_corpus", "stats_device"):
        if key in settings:
            setattr(cfg, key, str(settings[key]))
    for key in ("stats_tokens", "rect"):
        if key in settings and settings[key] is not None:
            setattr(cfg, key, _typed(settings[key], 1.0 if key == "rect" else 1, key))
    if settings.get("eval_protocol"):
        cfg.apply_eval_protocol(str(settings["eval_protocol"]))
    return cfg


def _typed(value: Any, current: Any, name: str) -> Any:
    """``value`` as the type of the setting's default (int, float, bool, str; None defaults take anything)."""
    if current is None or value is None:
        return value
    kind = type(current)
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind in (int, float)
        else isinstance(value, str)
    )
    if not ok or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise UserError(f"The grid's '{name}' must be {kind.__name__}, not {value!r}.")
    if kind is float and not math.isfinite(float(value)):
        raise UserError(f"The grid's '{name}' must be a finite number, not {value!r}.")
    return kind(value)


def experiment_config(base: ExperimentConfig, exp: Experiment, model_path: str) -> ExperimentConfig:
    """The config one experiment runs with: the grid's shared settings, its model, method, layers and hparams."""
    cfg = copy.deepcopy(base)
    cfg.model = replace(cfg.model, name=model_path)
    cfg.method = exp.method
    cfg.layers = list(exp.layers) if exp.layers is not None else None
    cfg.hparams = dict(exp.hparams)
    return cfg


def resolve_model(name: str, data_dir: str | None) -> str:
    """A grid's model name as load_model takes it: "demo" is the embedded demo model (built once, cached)."""
    if name == "demo":
        from detox_tui.demo import ensure_demo

        return str(ensure_demo(data_dir).folder / "model")
    return name


def load_items(
    settings: Mapping[str, Any], data_dir: str | None = None
) -> tuple[list[PromptItem], list[PromptItem]]:
    """The grid's prompts (first ``limit``; "demo": the demo model's prompt set) and its holdout prompts."""
    from detox_tui.prompts import load_prompts

    source = str(settings.get("prompts", "builtin"))
    if source == "demo":
        from detox_tui.demo import ensure_demo

        source = str(ensure_demo(data_dir).prompts)
    limit = settings.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"The grid's 'limit' must be a positive whole number, not {limit!r}.")
    items = load_prompts(source, limit=limit)
    if not items:
        raise UserError(f"The prompt source '{source}' gave no prompts.")
    holdout = settings.get("holdout")
    held = load_prompts(str(holdout)) if holdout else []
    return items, held


# ------------------------------------------------------------------------------------------------ worker


@dataclass
class Prepared:
    """A model's shared inputs (``SharedInputs``) with the experiments that failed validation on it (id -> error)."""

    shared: Any
    errors: dict[str, str]


@dataclass
class Outcome:
    """What a worker hands back for one experiment: its run (``RunStore.dump_run``) or its error; seconds it took."""

    exp_id: str
    worker: str
    elapsed_s: float
    run: dict[str, Any] | None = None
    error: str | None = None


class SweepWorker:
    """Runs a sweep's experiments in one process, one model loaded at a time.

    Every experiment starts from the model's original weights (edits are applied inside ``EditDelta.applied_to``,
    which restores them bit-exactly; with ``verify`` the weights' fingerprint is checked after each). Runs go to a
    private scratch store and come back as plain data: the worker never writes the sweep's run store.
    """

    def __init__(
        self, name: str, data_dir: str | None = None, threads: int | None = None, verify: bool = False
    ):
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.name = name
        self.data_dir = data_dir
        self.paths = Paths.resolve(data_dir)
        self.verify = verify
        self._tmp = Path(tempfile.mkdtemp(prefix="detox-sweep-"))
        self.scratch = RunStore(self._tmp / "scratch.sqlite")
        self._wb = None
        self._key: tuple | None = None
        self._fingerprint: str | None = None

    def close(self) -> None:
        self._wb = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def ping(self) -> str:
        return self.name

    def workbench(self, cfg: ExperimentConfig):
        """The model and scorer of ``cfg``, loaded once and kept until an experiment needs another."""
        from detox_tui.pipeline.experiment import Workbench, _did_not_load, _reason

        key = (cfg.model.name, cfg.model.device, cfg.model.dtype, cfg.model.revision, cfg.scoring.scorer)
        if self._key != key:
            self._wb, self._key = None, None
            lm = Workbench.load_model(cfg)
            try:
                scorer = Workbench.load_scorer(cfg, lm)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - name the component that failed
                raise UserError(_did_not_load("scorer", cfg.scoring.scorer, _reason(exc))) from exc
            self._wb = Workbench(lm=lm, scorer=scorer, store=self.scratch, paths=self.paths, config=cfg)
            self._key = key
            if self.verify:
                from detox_tui.backends.models import weights_fingerprint

                self._fingerprint = weights_fingerprint(lm.model)
        self._wb.config = cfg
        return self._wb

    def prepare(
        self,
        base: ExperimentConfig,
        experiments: Sequence[Experiment],
        model_path: str,
        items: Sequence[PromptItem],
        holdout: Sequence[PromptItem],
        cancel: threading.Event | None = None,
    ) -> Prepared:
        """Validate one model's experiments; compute, once, the before phase, the side effects' reference and the
        covariance for the union of the layers its covariance-based experiments edit."""
        from detox_tui.pipeline.experiment import prepare_shared
        from detox_tui.pipeline.validation import validate_edit

        cfg = experiment_config(base, experiments[0], model_path)
        wb = self.workbench(cfg)
        errors: dict[str, str] = {}
        union: set[int] = set()
        for exp in experiments:
            ecfg = experiment_config(base, exp, model_path)
            try:
                checked = validate_edit(wb.lm, ecfg, items, holdout)
            except UserError as exc:
                errors[exp.id] = str(exc)
                continue
            if checked.editor.needs_covariance:
                layers = checked.hparams[0].get("layers") if checked.hparams else None
                union.update(int(x) for x in (layers or exp.layers or ()))
        shared = None
        if len(errors) < len(experiments):
            shared = prepare_shared(
                wb, items, cfg, holdout=holdout, covariance_layers=sorted(union), cancel=cancel
            )
        return Prepared(shared, errors)

    def run(
        self,
        base: ExperimentConfig,
        exp: Experiment,
        model_path: str,
        items: Sequence[PromptItem],
        holdout: Sequence[PromptItem],
        shared: Any,
        cancel: threading.Event | None = None,
    ) -> Outcome:
        """One experiment as ``detox-tui edit`` would run it; an error is returned, not raised (the sweep goes on),
        except a cancel."""
        from detox_tui.backends.models import weights_fingerprint
        from detox_tui.pipeline.experiment import run_edit

        t0 = time.perf_counter()
        cfg = experiment_config(base, exp, model_path)
        try:
            wb = self.workbench(cfg)
            result = run_edit(
                wb, items, cfg, holdout=holdout, cancel=cancel, shared=shared, verify=self.verify
            )
            if self.verify and weights_fingerprint(wb.lm.model) != self._fingerprint:
                raise RuntimeError("Weights differ from the original after an experiment; this is a bug.")
            dump = self.scratch.dump_run(result.run_id)
            return Outcome(exp.id, self.name, time.perf_counter() - t0, run=dump)
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is this experiment's, recorded with its error
            log.debug("experiment %s failed", exp.id, exc_info=True)
            message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            return Outcome(exp.id, self.name, time.perf_counter() - t0, error=message)
        finally:
            # The scratch store holds this experiment's run only (finished, failed or cancelled): handed back or
            # not, it goes.
            for r in self.scratch.list_runs(limit=1000):
                self.scratch.delete_run(r["id"])


# ------------------------------------------------------------------------------------------------ the driver


@dataclass(frozen=True)
class SweepEvent:
    """A change the driver made: an experiment's new state (its sweep row), or a message."""

    kind: str  # "expanded" | "state" | "log"
    row: dict[str, Any] | None = None
    message: str = ""
    total: int = 0
    done: int = 0
    run_id: str = ""


SweepCallback = Callable[[SweepEvent], None]


class Backend(Protocol):
    """Runs prepared experiments and yields outcomes as they finish (the driver stores each one at once)."""

    name: str

    def start(self, n_experiments: int) -> None: ...

    def prepare(self, base, experiments, model_path, items, holdout) -> Prepared: ...

    def run(self, base, experiments, model_path, items, holdout, prepared, on_start) -> Iterable[Outcome]: ...

    def stop(self) -> None: ...


class LocalBackend:
    """In this process, in order: one SweepWorker (created when the sweep starts, removed when it stops)."""

    name = "local"

    def __init__(self, data_dir: str | None = None, verify: bool = False):
        self.cancel = threading.Event()
        self.data_dir, self.verify = data_dir, verify
        self.worker: SweepWorker | None = None

    def start(self, n_experiments: int) -> None:
        self.worker = SweepWorker("local", self.data_dir, verify=self.verify)

    def prepare(self, base, experiments, model_path, items, holdout) -> Prepared:
        assert self.worker is not None, "start() first"
        return self.worker.prepare(base, experiments, model_path, items, holdout, cancel=self.cancel)

    def run(self, base, experiments, model_path, items, holdout, prepared, on_start):
        assert self.worker is not None, "start() first"
        for exp in experiments:
            check_cancel(self.cancel)
            on_start(exp, self.worker.name, 1)
            yield self.worker.run(base, exp, model_path, items, holdout, prepared.shared, cancel=self.cancel)

    def stop(self) -> None:
        self.cancel.set()
        if self.worker is not None:
            self.worker.close()
            self.worker = None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def pending_row(exp: Experiment) -> dict[str, Any]:
    return {
        **exp.to_dict(),
        "key": exp.label,
        "state": "pending",
        "worker": None,
        "attempts": 0,
        "started": None,
        "elapsed_s": None,
        "run_id": None,
        "error": None,
    }


def _headline(run_dump: Mapping[str, Any]) -> dict[str, Any]:
    """An experiment's ablation-row numbers from its edit summary (the share detoxified with its CI, ...)."""
    from detox_tui.pipeline.records import AblationRow, EditSummary

    summary = EditSummary.from_dict(run_dump["summary"])
    layers = summary.layers if summary.layers is not None else ()
    row = AblationRow.of(layers, summary).to_dict()
    row.pop("key", None)
    row["layers"] = list(layers) if summary.layers is not None else None
    return row


class SweepRecorder:
    """The driver's view of a sweep in the store: the sweep run and one row per experiment."""

    def __init__(self, store: RunStore, run_id: str, rows: dict[str, dict[str, Any]], emit: SweepCallback):
        self.store, self.run_id, self.rows, self.emit = store, run_id, rows, emit

    def update(self, exp_id: str, **changes: Any) -> dict[str, Any]:
        """Change an experiment's row and store it (the driver's thread only: backends yield to it)."""
        row = {**self.rows[exp_id], **changes}
        self.rows[exp_id] = row
        self.store.add_row(self.run_id, "sweep", exp_id, row)
        done = sum(r["state"] in ("finished", "failed") for r in self.rows.values())
        self.emit(SweepEvent("state", row=row, total=len(self.rows), done=done))
        return row

    def summary(self) -> dict[str, Any]:
        rows = list(self.rows.values())
        finished = [r for r in rows if r["state"] == "finished"]
        best = max(finished, key=lambda r: r.get("share_detoxified") or 0.0, default=None)
        best_share = best.get("share_detoxified") if best else None
        return {
            "n_experiments": len(rows),
            "n_finished": len(finished),
            "n_failed": sum(r["state"] == "failed" for r in rows),
            "best": best["label"] if best and best_share else None,
            "best_share_detoxified": best_share if best else None,
        }


def create_sweep(store: RunStore, grid: Grid, backend: str) -> str:
    """Store the sweep and its expanded experiments (all pending) before anything runs; its run id."""
    config = {
        "grid": grid.to_dict(),
        "experiments": [e.to_dict() for e in grid.experiments],
        "backend": backend,
        "config": grid.base_config().to_dict(),
    }
    run_id = store.create_run("sweep", config, model=", ".join(grid.models))
    for exp in grid.experiments:
        store.add_row(run_id, "sweep", exp.id, pending_row(exp))
    return run_id


def stored_sweep(store: RunStore, run_id: str) -> tuple[dict[str, Any], Grid]:
    """A stored sweep (id or unique prefix) and the grid it was created from; a run of another kind is refused."""
    run = store.get_run(run_id)
    if run["kind"] != "sweep":
        raise UserError(f"Run '{run_id}' is a {run['kind']} run, not a sweep.")
    return run, grid_of_run(run)


def grid_of_run(run: Mapping[str, Any]) -> Grid:
    """The grid a stored sweep was created from (for --resume)."""
    config = run.get("config") or {}
    grid = config.get("grid") or {}
    return Grid(
        source=grid.get("source") or {},
        settings=grid.get("settings") or {},
        experiments=[Experiment.from_dict(e) for e in config.get("experiments") or []],
        path=grid.get("path") or "",
    )


def run_sweep(
    store: RunStore,
    grid: Grid,
    backend: Backend,
    *,
    data_dir: str | None = None,
    resume: str | None = None,
    emit: SweepCallback = lambda e: None,
) -> tuple[str, dict[str, Any]]:
    """Run a grid's experiments (or, with ``resume``, a stored sweep's unfinished ones) and return (run id, summary).

    The sweep and its experiments are in the store before the first one runs; each outcome is stored as it arrives.
    A failed experiment is recorded with its error and the sweep goes on. Ctrl-C (KeyboardInterrupt) or a cancel
    marks the sweep and its running experiments cancelled (finished ones are kept) and re-raises.
    """
    if resume:
        run, grid = stored_sweep(store, resume)
    # The prompts are read (and a bad prompt file refused) before the sweep is stored or resumed.
    items, holdout = load_items(grid.settings, data_dir)
    if resume:
        run_id = run["id"]
        rows = {r["id"]: r for r in store.rows(run_id, "sweep")}
        store.set_status(run_id, "running", clear_error=True)
    else:
        run_id = create_sweep(store, grid, backend.name)
        rows = {e.id: pending_row(e) for e in grid.experiments}
    rec = SweepRecorder(store, run_id, rows, emit)
    todo = [e for e in grid.experiments if rows.get(e.id, {}).get("state") != "finished"]
    emit(
        SweepEvent(
            "expanded",
            message=f"sweep {run_id}: {len(grid.experiments)} experiments, {len(todo)} to run on {backend.name}",
            total=len(grid.experiments),
            done=len(grid.experiments) - len(todo),
            run_id=run_id,
        )
    )
    for exp in todo:
        if rows[exp.id]["state"] != "pending":
            rec.update(
                exp.id, state="pending", worker=None, error=None, run_id=None, elapsed_s=None, started=None
            )
    base = grid.base_config()
    started: dict[str, float] = {}

    def on_start(exp: Experiment, worker: str, attempt: int) -> None:
        started[exp.id] = time.perf_counter()
        rec.update(exp.id, state="running", worker=worker, attempts=attempt, started=_now(), error=None)

    try:
        backend.start(len(todo))
        for model in dict.fromkeys(e.model for e in todo):
            exps = [e for e in todo if e.model == model]
            try:
                model_path = resolve_model(model, data_dir)
                emit(
                    SweepEvent(
                        "log", message=f"{model}: before phase and statistics for {len(exps)} experiments"
                    )
                )
                prepared = backend.prepare(base, exps, model_path, items, holdout)
            except (Cancelled, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - the model did not load or prepare: its experiments fail
                error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                for exp in exps:
                    rec.update(exp.id, state="failed", error=error)
                continue
            for exp_id, error in prepared.errors.items():
                rec.update(exp_id, state="failed", error=error)
            runnable = [e for e in exps if e.id not in prepared.errors]
            for out in backend.run(base, runnable, model_path, items, holdout, prepared, on_start):
                _record(store, rec, run_id, out, started)
        summary = rec.summary()
        store.set_status(run_id, "finished", summary=summary)
        return run_id, summary
    except BaseException as exc:
        cancelled = isinstance(exc, (KeyboardInterrupt, Cancelled))
        for exp_id, row in list(rec.rows.items()):
            if row["state"] == "running":
                rec.update(
                    exp_id,
                    state="cancelled" if cancelled else "failed",
                    error=None if cancelled else str(exc),
                )
        store.set_status(
            run_id,
            "cancelled" if cancelled else "failed",
            summary=rec.summary(),
            error=None if cancelled else (str(exc) or type(exc).__name__),
        )
        raise
    finally:
        backend.stop()


def _record(
    store: RunStore, rec: SweepRecorder, sweep_id: str, out: Outcome, started: dict[str, float]
) -> None:
    if out.error is not None or out.run is None:
        rec.update(
            out.exp_id, state="failed", error=out.error, worker=out.worker, elapsed_s=round(out.elapsed_s, 3)
        )
        return
    row = rec.rows[out.exp_id]
    child = store.import_run(
        out.run, config_extra={"sweep": sweep_id, "experiment": out.exp_id, "label": row["label"]}
    )
    rec.update(
        out.exp_id,
        state="finished",
        worker=out.worker,
        elapsed_s=round(out.elapsed_s, 3),
        run_id=child,
        error=None,
        **_headline(out.run),
    )


def comparable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep row without what depends on where and when it ran (worker, times, run ids): for comparing sweeps."""
    drop = {"worker", "started", "elapsed_s", "run_id", "attempts"}
    return {k: v for k, v in row.items() if k not in drop}


def experiment_rows(grid: Grid) -> list[dict[str, Any]]:
    """The expanded list as rows to show before anything runs."""
    return [
        {
            "id": e.id,
            "model": e.model,
            "method": e.method,
            "layers": ",".join(map(str, e.layers)) if e.layers is not None else "preset",
            "hparams": " ".join(f"{k}={_fmt(v)}" for k, v in e.hparams.items()),
        }
        for e in grid.experiments
    ]


__all__ = [
    "Experiment",
    "Grid",
    "LocalBackend",
    "Outcome",
    "Prepared",
    "SweepEvent",
    "SweepWorker",
    "comparable",
    "create_sweep",
    "expand_grid",
    "stored_sweep",
    "experiment_rows",
    "load_grid",
    "run_sweep",
]
