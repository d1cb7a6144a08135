"""Benchmark: key-to-paint latency of the Textual app's tab keys, idle and while a MEMIT edit runs.

The app runs headless under Textual's Pilot (``app.run_test``) on a randomly initialised GPT-2 (built once and
cached under the temp dir), with the profanity scorer, on the CPU. The busy phase starts a MEMIT edit ("e") on
all prompts and presses the tab keys "1".."7" in turn while the edit's thread worker does real engine work
(generation, scoring, covariance, z optimisation, side effects); when an edit ends before all keys are measured
another one is started. ``--idle`` measures the same presses first with nothing running.

Key-to-paint latency, as measured here (Textual 8.2.8):

* t0: just before the key event is handed to the driver, as a terminal's input thread does
  (``driver.send_message(events.Key(...))``, what ``Pilot.press`` does internally; we do not await
  ``pilot.press``, which also waits for the app to go idle).
* A frame: every screen update reaches the terminal through ``App._display(screen, renderable)``, called by
  ``Screen._compositor_refresh`` after ``_refresh_layout`` / the screen's update timer. The headless driver
  skips the rendering step, so the benchmark wraps ``_display`` on the app instance and renders the
  compositor update to the terminal byte string itself (``CompositorUpdate.render_segments(console)``, the
  work a real driver does before writing), then takes the frame's timestamp.
* t1: the timestamp of the first frame after t0 at which the ``TabbedContent``'s ``active`` is the key's tab
  AND that tab's pane is in the compositor's visible widgets, i.e. the first frame written whose content
  shows the newly active tab.
* latency = t1 - t0. Also reported: key-to-active (t0 to the moment ``TabbedContent.active`` changed, seen by
  a watcher), which separates waiting for the event loop from layout and painting.

The user-facing figure adds the terminal's own input parsing and drawing (tmux measured 87-152 ms medians);
this benchmark isolates the app's share. Output: JSON on stdout and in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
try:  # PYTHONPATH or an install first; this checkout's package only as a fallback
    import detox_tui  # noqa: F401
except ImportError:
    sys.path.append(str(HERE.parent))
CACHE = Path(tempfile.gettempdir()) / "detox-tui-bench"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where /proc/loadavg does not exist)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def model_dir(n_layer: int, n_embd: int) -> Path:
    """A random GPT-2 of the given shape with the tiny BPE tokenizer, built once and reused."""
    from detox_tui.tiny import save_random_model

    out = CACHE / f"app-latency-gpt2-{n_layer}x{n_embd}"
    if not (out / "config.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
        save_random_model(tmp, n_layer=n_layer, n_embd=n_embd)
        try:
            tmp.rename(out)
        except OSError:  # another run built it meanwhile
            pass
    return out


def write_prompts(path: Path, n: int) -> Path:
    """``n`` prompts with safe targets: the insult prompts, then openings of neutral lines."""
    from detox_tui.tiny import INSULT_PAIRS, neutral_lines

    lines = neutral_lines()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            prompt, _insult, safe = INSULT_PAIRS[i % len(INSULT_PAIRS)]
            if i >= len(INSULT_PAIRS):
                prompt = " ".join(lines[i % len(lines)].split()[:6])
            f.write(json.dumps({"prompt": prompt, "target": safe, "category": "insult"}) + "\n")
    return path


def stats(values: list[float]) -> dict[str, Any]:
    """p50 / p95 / max / mean / n of ``values`` (seconds), in milliseconds."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p95_ms": round(p95 * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
        "mean_ms": round(statistics.fmean(values) * 1000, 1),
    }


class GcProbe:
    """Collector pauses (any thread; the collector holds the GIL, so the UI loop waits too)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []  # (start, seconds, generation)
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((self._t0, time.perf_counter() - self._t0, info["generation"]))

    def summary(self, since: float, until: float) -> dict[str, Any]:
        inside = [(d, g) for t, d, g in self.pauses if since <= t < until]
        out: dict[str, Any] = {}
        for gen in (0, 1, 2):
            pauses = [d for d, g in inside if g == gen]
            out[f"gen{gen}"] = {
                "collections": len(pauses),
                "total_ms": round(sum(pauses) * 1000, 1),
                "max_ms": round(max(pauses, default=0.0) * 1000, 1),
            }
        return out


class FrameProbe:
    """Wraps the app's display path: renders and timestamps each frame, resolves the pending key's latency."""

    def __init__(self, app: Any, tabbed: Any) -> None:
        from textual._compositor import CompositorUpdate

        self.app = app
        self.tabbed = tabbed
        self.frames: list[float] = []
        self.bytes = 0
        self.pending: tuple[float, str, Any] | None = None  # (t0, tab id, pane)
        self.t_active: float | None = None
        self.t_paint: float | None = None
        self.done = asyncio.Event()
        inner = app._display

        def display(screen: Any, renderable: Any) -> None:
            if renderable is not None and not app._batch_count:
                # What a real driver does before writing: the update as a terminal byte string.
                if isinstance(renderable, CompositorUpdate):
                    self.bytes += len(renderable.render_segments(app.console))
                else:
                    self.bytes += len(app.console._render_buffer(app.console.render(renderable)))
            inner(screen, renderable)
            if renderable is None or app._batch_count:
                return
            now = time.perf_counter()
            self.frames.append(now)
            if self.pending is not None and self.t_paint is None:
                t0, tab, pane = self.pending
                if now > t0 and tabbed.active == tab and pane in screen._compositor.visible_widgets:
                    self.t_paint = now
                    self.done.set()

        app._display = display  # instance attribute: Screen._compositor_refresh calls app._display
        app.watch(tabbed, "active", self._active_changed, init=False)

    def _active_changed(self, value: str) -> None:
        if self.pending is not None and self.t_active is None and value == self.pending[1]:
            self.t_active = time.perf_counter()

    async def press_tab(
        self, key: str, tab: str, pane: Any, timeout: float
    ) -> tuple[float | None, float | None]:
        """Inject ``key``; (key-to-paint, key-to-active) in seconds, None where nothing came within ``timeout``."""
        from textual import events

        self.t_active = self.t_paint = None
        self.done.clear()
        event = events.Key(key, key)
        event.set_sender(self.app)
        t0 = time.perf_counter()
        self.pending = (t0, tab, pane)
        self.app._driver.send_message(event)
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self.pending = None
        paint = None if self.t_paint is None else self.t_paint - t0
        active = None if self.t_active is None else self.t_active - t0
        return paint, active


def stage_text(app: Any) -> str:
    """The status bar's stage label (e.g. "edit: generating 3/60"), "" where the app has none."""
    try:
        return str(app.query_one("#stage").content)
    except Exception:  # noqa: BLE001 - another version of the app: the stage is only informative
        return ""


async def wait_until(pilot: Any, predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.05)


async def measure(args: argparse.Namespace, work: Path, result: dict[str, Any]) -> None:
    """Run the app and fill ``result`` as the phases finish (what was measured survives an app crash)."""
    from textual.widgets import ContentSwitcher, TabbedContent

    from detox_tui.app import DetoxApp

    model = model_dir(args.n_layer, args.n_embd)
    prompts = write_prompts(work / "prompts.jsonl", args.prompts)
    layers = [int(x) for x in args.layers.split(",")]
    hparams = {
        "mom2_update_weight": 100.0,
        "clamp_norm_factor": 4.0,
        "v_num_grad_steps": args.steps,
        "n_templates": 2,
    }
    run_settings = {
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "threshold": 0.1,
        "seed": 0,
    }
    app = DetoxApp(
        model=str(model),
        prompts=str(prompts),
        scorer="profanity",
        device="cpu",
        dtype="float32",
        data_dir=str(work / "data"),
        method="memit",
        layers=layers,
        hparams=hparams,
        run_settings=run_settings,
    )
    rng = random.Random(args.seed)
    phases: dict[str, Any] = result.setdefault("phases", {})
    edits: list[float] = result.setdefault("edits_completed_seconds", [])  # edits ended while busy
    async with app.run_test(size=(120, 40)) as pilot:
        t_load = time.perf_counter()
        await wait_until(
            pilot, lambda: app.workbench is not None or app.load_error is not None, 300, "the model"
        )
        if app.load_error:
            raise SystemExit(f"the model did not load: {app.load_error}")
        result["load_seconds"] = round(time.perf_counter() - t_load, 1)
        tabbed = app.query_one(TabbedContent)
        panes = list(tabbed.query_one(ContentSwitcher).children)
        await wait_until(pilot, lambda: bool(app.query_one("PromptPicker").items), 60, "the prompts")
        await pilot.press("1")
        app.query_one("#prompt-list").focus()
        await pilot.press("ctrl+a")
        if args.gc_freeze:
            gc.collect()
            gc.freeze()  # what the app could do once the model is loaded: old objects never scanned again
        probe = FrameProbe(app, tabbed)
        result["probe"] = probe
        gcp = GcProbe()
        order = [str(i + 1) for i in range(min(7, len(panes)))]
        cursor = 0

        async def start_edit() -> float:
            await wait_until(pilot, lambda: app.running is None, 600, "the previous run to end")
            await pilot.press("e")
            await wait_until(pilot, lambda: app.running == "edit", 60, "the edit to start")
            return time.perf_counter()

        async def run_keys(phase: str, busy: bool) -> None:
            nonlocal cursor
            paints: list[float] = []
            actives: list[float] = []
            timeouts = discarded = 0
            per_tab: dict[str, list[float]] = {}
            samples: list[list[Any]] = []  # [tab, the status bar's stage when pressed, key-to-paint ms]
            edit_start = await start_edit() if busy else 0.0
            t_start, f_start = time.perf_counter(), len(probe.frames)
            while len(paints) + timeouts < args.keys:
                if busy and app.running != "edit":
                    edits.append(round(time.perf_counter() - edit_start, 1))  # ended (within ~0.3 s)
                    edit_start = await start_edit()
                    continue
                key = order[cursor % len(order)]
                cursor += 1
                pane = panes[int(key) - 1]
                if tabbed.active == pane.id:
                    continue
                stage = stage_text(app)
                paint, active = await probe.press_tab(key, pane.id, pane, args.timeout)
                if busy and app.running != "edit":
                    discarded += 1  # the edit ended while this key was pending: not a busy sample
                    continue
                if paint is None:
                    timeouts += 1
                else:
                    paints.append(paint)
                    samples.append([pane.id, stage, round(paint * 1000, 1)])
                    per_tab.setdefault(pane.id, []).append(paint)
                if active is not None:
                    actives.append(active)
                await asyncio.sleep(rng.uniform(0.05, 0.25))
            elapsed = time.perf_counter() - t_start
            phases[phase] = {
                "key_to_paint": stats(paints),
                "key_to_active": stats(actives),
                "timeouts": timeouts,
                "discarded": discarded,
                "frames_per_s": round((len(probe.frames) - f_start) / elapsed, 1),
                "gc": gcp.summary(t_start, t_start + elapsed),
                "seconds": round(elapsed, 1),
                "key_to_paint_by_tab": {tab: stats(v) for tab, v in per_tab.items()},
                "samples": samples,
            }
            print(f"{phase}: {json.dumps(phases[phase]['key_to_paint'])}", file=sys.stderr, flush=True)

        if args.idle:
            await run_keys("idle", busy=False)
        await run_keys("busy", busy=True)
        # Stop the last edit (its weights are restored) so the app closes cleanly; best effort.
        if hasattr(app, "cancel_event"):
            app.cancel_event.set()
        else:
            await pilot.press("ctrl+x")
        with contextlib.suppress(SystemExit):
            await wait_until(pilot, lambda: app.running is None, 120, "the edit to stop")


def git_commit(path: Path) -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(path), *cmd], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": run("rev-parse", "HEAD"),
        "app_py_modified": bool(run("status", "--porcelain", "app.py")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=100, help="tab key presses per phase")
    parser.add_argument("--idle", action="store_true", help="also measure the presses with nothing running")
    parser.add_argument("--out", default=str(HERE / "results" / "app_latency.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--n-layer", type=int, default=6, help="blocks of the random GPT-2")
    parser.add_argument("--n-embd", type=int, default=256, help="d_model of the random GPT-2 (MLP 4x)")
    parser.add_argument("--layers", default="1,2,3", help="MEMIT layers")
    parser.add_argument("--prompts", type=int, default=12, help="prompts edited")
    parser.add_argument("--samples", type=int, default=5, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--steps", type=int, default=25, help="MEMIT v_num_grad_steps")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one key's frame")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="experiment: gc.freeze() once the model has loaded (not what the app does)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the gaps between keys")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(
        tempfile.mkdtemp(prefix="app-latency-", dir=CACHE)
    )  # prompts, run store, caches: fresh each run
    os.environ.setdefault("DETOX_TUI_HOME", str(work / "home"))

    import textual
    import transformers

    import detox_tui

    before = loadavg()
    result: dict[str, Any] = {}
    error = None
    try:
        asyncio.run(measure(args, work, result))
    except Exception as exc:  # noqa: BLE001 - the app crashed: keep what was measured, say so
        error = f"{type(exc).__name__}: {exc}"
        print(f"the app failed: {error}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    probe = result.pop("probe", None)
    result["frame_bytes"] = probe.bytes if probe is not None else 0
    if error:
        result["app_error"] = error
    package = Path(detox_tui.__file__).resolve().parent
    out = {
        "benchmark": "key-to-paint latency of the app's tab keys (1-7), idle and while a MEMIT edit runs",
        "definition": "key injected (driver.send_message) -> first frame through App._display, rendered to "
        "terminal bytes, whose TabbedContent.active is the key's tab and whose compositor shows its pane",
        "model": f"random GPT-2, {args.n_layer} x {args.n_embd}, d_mlp {4 * args.n_embd}",
        "edit": {
            "method": "memit",
            "layers": [int(x) for x in args.layers.split(",")],
            "prompts": args.prompts,
            "samples": args.samples,
            "max_new_tokens": args.max_new_tokens,
            "v_num_grad_steps": args.steps,
        },
        "keys_per_phase": args.keys,
        "gc_freeze": args.gc_freeze,
        "gc_threshold": list(gc.get_threshold()),
        **result,
        "detox_tui": str(package),
        "git": git_commit(package),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "textual": textual.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    if error:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
