"""The embedded demo: a tiny GPT-2 that insults on cue, its prompt set and settings that work for it; no download.

``ensure_demo`` builds the model once under ``<data dir>/demo/v<version>-<key>/`` (the key hashes what the build
depends on) and reuses it afterwards; a partial or corrupt folder is detected (a manifest with every file's
SHA-256, written last) and rebuilt. A build goes to a temporary folder that is renamed into place, so an
interrupted build never leaves a folder that looks finished. ``run_headless`` runs baseline -> MEMIT edit ->
verdict on it through the engine; ``app_options`` gives the app the same settings, prefilled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detox_tui.config import (
    ExperimentConfig,
    GenerationConfig,
    ModelConfig,
    Paths,
    ScoringConfig,
    VerdictConfig,
)
from detox_tui.errors import UserError
from detox_tui.events import EventCallback, Log, Progress, check_cancel, null_callback

DEMO_VERSION = 1
MANIFEST = "demo.json"
MODEL_DIR = "model"
PROMPTS_FILE = "prompts.jsonl"
BUILD_STAGE = "build demo model"

# How the demo model is trained: arguments of detox_tui.tiny.train_insult_model. Fewer, smaller steps at a higher
# learning rate than the test suite's model (300 steps of 30 texts at 3e-3), measured in benchmarks/bench_demo.py:
# the edit still detoxifies every prompt for training seeds 0, 1 and 2 while the training loop is ~6x cheaper.
# A smaller tokenizer vocabulary was slower (longer sequences), so it stays at 600.
BUILD: dict[str, Any] = {
    "steps": 80,
    "lr": 5e-3,
    "safe_per_step": 4,
    "neutral_per_step": 4,
    "n_layer": 4,
    "n_embd": 64,
    "seed": 0,
}

# The settings that work for it (the same as tests/test_experiment.py's TINY_MEMIT and the screenshots): MEMIT on
# blocks 1 and 2 of 4, first-word safe targets, five samples per prompt (the smallest one-sided paired p over k
# samples is 2^-k, so four could never be significant at 0.05), the embedded profanity scorer.
RUN: dict[str, Any] = {
    "method": "memit",
    "layers": [1, 2],
    "hparams": {"mom2_update_weight": 100.0, "clamp_norm_factor": 4.0, "n_templates": 2},
    "run_settings": {"samples": 5, "max_new_tokens": 8, "threshold": 0.1, "seed": 0},
    "scorer": "profanity",
    "ablation": [[1], [2], [1, 2]],
}

# One torch thread: on a small shared machine the demo's tiny matrices run several times slower with two threads
# fighting over the cores (measured: an edit run took 10-12 s with one thread, 45-70 s with two, under load).
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class DemoModel:
    """A built demo: where its model and prompts are, and whether this call built it or reused the cache."""

    folder: Path
    manifest: dict[str, Any]
    built: bool

    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_DIR

    @property
    def prompts(self) -> Path:
        return self.folder / PROMPTS_FILE


def prompt_records() -> list[dict[str, str]]:
    """The demo's prompt set: each insulting prompt with the first word of its safe target and the insult."""
    from detox_tui.tiny import INSULT_PAIRS

    # The model knows each safe continuation after other openings (tiny.SAFE_OPENINGS): the edit asks for its first
    # word and the model carries on from there, as a real model carries on fluent text.
    return [
        {"prompt": prompt, "target": " " + safe.split()[0], "category": "insult", "toxic": insult}
        for prompt, insult, safe in INSULT_PAIRS
    ]


def cache_key(build: dict[str, Any] | None = None) -> str:
    """A short hash of everything the built model depends on: version, build arguments, training texts, prompts."""
    from detox_tui.tiny import INSULT_PAIRS, SAFE_OPENINGS, neutral_lines

    spec = {
        "version": DEMO_VERSION,
        "build": BUILD if build is None else build,
        "insult_pairs": INSULT_PAIRS,
        "safe_openings": SAFE_OPENINGS,
        "neutral": neutral_lines(),
        "prompts": prompt_records(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def demo_root(data_dir: str | os.PathLike | None = None) -> Path:
    return Paths.resolve(data_dir).data_dir / "demo"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_problem(folder: Path, key: str) -> str | None:
    """Why ``folder`` is not a finished demo build for ``key`` (None when it is)."""
    path = folder / MANIFEST
    if not folder.is_dir():
        return "not built yet"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{MANIFEST} is missing or unreadable"
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return f"{MANIFEST} is for another build"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} lists no files"
    for name, digest in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} is damaged"
    return None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: leave torch's setting), then restore it."""
    if n is None:
        yield
        return
    if n < 1:
        raise UserError(f"The thread count must be at least 1, not {n}.")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_into(
    folder: Path,
    key: str,
    build: dict[str, Any],
    emit: EventCallback,
    cancel: threading.Event | None,
) -> dict[str, Any]:
    """Train the model and write the prompts and, last, the manifest into ``folder``."""
    from detox_tui.tiny import train_insult_model

    start = time.perf_counter()
    steps = int(build["steps"])
    emit(Progress(BUILD_STAGE, 0, steps, "tokenizer"))

    def progress(done: int, total: int) -> None:
        check_cancel(cancel)
        emit(Progress(BUILD_STAGE, done, total))

    train_insult_model(folder / MODEL_DIR, progress=progress, **build)
    with open(folder / PROMPTS_FILE, "w", encoding="utf-8") as f:
        for record in prompt_records():
            f.write(json.dumps(record) + "\n")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {
        "version": DEMO_VERSION,
        "key": key,
        "build": build,
        "run": RUN,
        "build_seconds": round(time.perf_counter() - start, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {p.relative_to(folder).as_posix(): _sha256(p) for p in files},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _clean_stale(root: Path, max_age_s: float = 3600.0) -> None:
    """Remove temporary folders of builds that were killed (older than an hour: another build may be running)."""
    now = time.time()
    for path in root.glob(".*-*"):
        if path.name.startswith((".build-", ".trash-")) and path.is_dir():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > max_age_s:
                    shutil.rmtree(path, ignore_errors=True)


def ensure_demo(
    data_dir: str | os.PathLike | None = None,
    *,
    rebuild: bool = False,
    build: dict[str, Any] | None = None,
    threads: int | None = DEFAULT_THREADS,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
) -> DemoModel:
    """The demo model and prompts under the data dir: reused when a finished build is there, else built now."""
    build = dict(BUILD if build is None else build)
    key = cache_key(build)
    root = demo_root(data_dir)
    folder = root / f"v{DEMO_VERSION}-{key}"
    problem = "a rebuild was asked for" if rebuild else cache_problem(folder, key)
    if problem is None:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return DemoModel(folder, manifest, built=False)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the demo folder '{root}': {exc.strerror or exc}.") from exc
    _clean_stale(root)
    if folder.exists():
        emit(Log(f"rebuilding the demo model in {folder}: {problem}", "warning"))
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    trash: Path | None = None
    try:
        with torch_threads(threads):
            manifest = _build_into(tmp, key, build, emit, cancel)
        if folder.exists():
            trash = root / f".trash-{uuid.uuid4().hex[:8]}"
            os.replace(folder, trash)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process finished the same build first: use theirs if it is whole.
            if cache_problem(folder, key) is not None:
                raise
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return DemoModel(folder, manifest, built=True)


def demo_config(demo: DemoModel) -> ExperimentConfig:
    """The edit the demo runs: RUN's method, layers and hyperparameters on the demo model, on the CPU."""
    settings = RUN["run_settings"]
    return ExperimentConfig(
        model=ModelConfig(name=str(demo.model_dir), device="cpu", dtype="float32"),
        generation=GenerationConfig(
            samples=settings["samples"], max_new_tokens=settings["max_new_tokens"], seed=settings["seed"]
        ),
        scoring=ScoringConfig(scorer=RUN["scorer"], threshold=settings["threshold"]),
        prompts=str(demo.prompts),
        method=RUN["method"],
        layers=list(RUN["layers"]),
        hparams=dict(RUN["hparams"]),
        verdict=VerdictConfig(),
    )


def load_workbench(
    demo: DemoModel, data_dir: str | os.PathLike | None = None, emit: EventCallback = null_callback
):
    """The engine session for the demo: its model on the CPU, the profanity scorer, the data dir's run store."""
    from detox_tui.pipeline.experiment import Workbench

    cfg = demo_config(demo)
    wb = Workbench.load(cfg, data_dir=str(data_dir) if data_dir else None, emit=emit)
    wb.lm.check_layers(cfg.layers or [])
    return wb


def run_demo_edit(
    wb,
    demo: DemoModel,
    *,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
    resume: str | None = None,
):
    """Baseline -> MEMIT edit -> after -> side effects -> verdict on the demo prompts (a RunResult, stored)."""
    from detox_tui.pipeline.experiment import run_edit
    from detox_tui.prompts import load_prompts

    items = load_prompts(str(demo.prompts))
    return run_edit(wb, items, demo_config(demo), emit=emit, cancel=cancel, resume=resume)


def run_headless(
    demo: DemoModel,
    data_dir: str | os.PathLike | None = None,
    *,
    threads: int | None = DEFAULT_THREADS,
    emit: EventCallback = null_callback,
    cancel: threading.Event | None = None,
):
    """load_workbench + run_demo_edit with ``threads`` torch threads (None: leave torch's setting)."""
    with torch_threads(threads):
        wb = load_workbench(demo, data_dir, emit)
        return run_demo_edit(wb, demo, emit=emit, cancel=cancel)


def app_options(demo: DemoModel, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Keyword arguments for detox_tui.app.DetoxApp: the demo model and prompts with RUN's settings prefilled."""
    return {
        "model": str(demo.model_dir),
        "prompts": str(demo.prompts),
        "scorer": RUN["scorer"],
        "device": "cpu",
        "dtype": "float32",
        "data_dir": str(data_dir) if data_dir else None,
        "method": RUN["method"],
        "layers": list(RUN["layers"]),
        "hparams": dict(RUN["hparams"]),
        "run_settings": dict(RUN["run_settings"]),
        "ablation": [list(c) for c in RUN["ablation"]],
    }
