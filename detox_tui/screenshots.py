"""Write screenshots/*.svg of the app's main screens, taken from the real app driving a tiny local model.

Usage: ``python -m detox_tui.screenshots [--out screenshots] [--model DIR] [--width 120 --height 40]``.
Without --model a tiny GPT-2 is trained on the fly (detox_tui.tiny.train_insult_model, about a minute on CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from detox_tui.tiny import INSULT_PAIRS

# MEMIT settings that suit the 4-layer tiny model (the gpt2 preset is tuned for gpt2-medium).
TINY_MEMIT = {"mom2_update_weight": "100", "v_num_grad_steps": "25", "clamp_norm_factor": "4"}


def _prompt_file(folder: Path) -> Path:
    path = folder / "prompts.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        # The tiny model knows its safe continuations after other openings: the edit asks for the first word.
        for prompt, _insult, safe in INSULT_PAIRS:
            target = " " + safe.split()[0]
            f.write(json.dumps({"prompt": prompt, "target": target, "category": "insult"}) + "\n")
    return path


async def _wait(pilot, predicate: Callable[[], bool], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not reach the expected state in time")
        await pilot.pause(0.1)
    await pilot.pause()


async def _type(pilot, field, value: str) -> None:
    field.focus()
    await pilot.pause()
    await pilot.press("end", *["backspace"] * len(field.value), *list(value))


def _sweep(model_dir: Path, prompts: Path, home: Path) -> None:
    """A real 4-experiment sweep (MEMIT x two layer sets x two clamp factors) into the store, for the Sweeps tab."""
    from detox_tui.pipeline.store import RunStore
    from detox_tui.pipeline.sweep import LocalBackend, expand_grid, run_sweep

    grid = expand_grid(
        {
            "models": [str(model_dir)],
            "prompts": str(prompts),
            "scorer": "profanity",
            "device": "cpu",
            "dtype": "float32",
            "methods": ["memit"],
            "layers": ["1,2", "2"],
            "generation": {"samples": 5, "max_new_tokens": 8},
            "hparams": {
                "memit": {
                    "mom2_update_weight": 100.0,
                    "v_num_grad_steps": 25,
                    "clamp_norm_factor": [4.0, 1.0],
                }
            },
        }
    )
    run_sweep(RunStore.open(str(home)), grid, LocalBackend(str(home)), data_dir=str(home))


async def take(model_dir: Path, out: Path, size: tuple[int, int], home: Path) -> list[Path]:
    """Drive the app through prompts -> layers -> baseline -> edit -> ablation -> trace -> runs -> export, then the
    Sweeps tab on a sweep run beforehand (as a headless `detox-tui sweep` would)."""
    from detox_tui.app import DetoxApp

    os.environ["DETOX_TUI_HOME"] = str(home)
    prompts = _prompt_file(home)
    _sweep(model_dir, prompts, home)
    app = DetoxApp(
        model=str(model_dir), prompts=str(prompts), scorer="profanity", device="cpu", dtype="float32"
    )
    written: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)

    async def shot(name: str, pilot) -> None:
        app.clear_notifications()
        await pilot.pause(0.2)
        path = out / f"{name}.svg"
        path.write_text(app.export_screenshot(title=f"detox-tui: {name}"), encoding="utf-8")
        written.append(path)

    async with app.run_test(size=size) as pilot:
        await _wait(pilot, lambda: app.workbench is not None or app.load_error is not None)
        if app.load_error:
            raise SystemExit(app.load_error)
        await _wait(pilot, lambda: bool(app.query_one("PromptPicker").items))
        await shot("prompts", pilot)

        # Five samples: the smallest one-sided paired p over k samples is 2^-k, so four could never be significant.
        await _type(pilot, app.query_one("#run-samples"), "5")
        await _type(pilot, app.query_one("#run-max_new_tokens"), "8")
        form = app.query_one("MethodForm")
        for key, value in TINY_MEMIT.items():
            await _type(pilot, form.hparam_inputs()[key], value)
        app.set_focus(None)
        await pilot.press("2")
        app.query_one("LayerPicker").set_layers([1, 2])
        app.query_one("LayerPicker").add_config([1, 2])
        app.query_one("LayerPicker").add_config([2])
        await shot("layers-and-method", pilot)

        await pilot.press("b")
        await _wait(pilot, lambda: app.running is None)
        await shot("baseline", pilot)

        await pilot.press("e")
        await _wait(pilot, lambda: app.running is None)
        await shot("edit-results", pilot)
        await pilot.press("d")
        await shot("prompt-detail", pilot)
        await pilot.press("escape")
        await pilot.press("question_mark")
        await shot("help", pilot)
        await pilot.press("escape")
        await pilot.press("comma")
        await shot("settings", pilot)
        await pilot.press("escape")

        await pilot.press("a")
        await _wait(pilot, lambda: app.running is None)
        await shot("ablation", pilot)

        await pilot.press("t")
        await pilot.pause()
        app.set_focus(None)
        await pilot.press("t")
        await _wait(pilot, lambda: app.running is None)
        await shot("trace", pilot)

        await pilot.press("6")
        await pilot.pause(app.STORE_POLL + 0.5)  # the runs list refreshes from the store by itself
        await shot("runs", pilot)

        await pilot.press("3", "x")
        await pilot.pause()
        await shot("export-dialog", pilot)
        await pilot.press("escape")

        await pilot.press("7")
        await pilot.pause(app.STORE_POLL + 0.5)
        await shot("sweeps", pilot)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="screenshots", help="folder for the SVG files")
    parser.add_argument("--model", default=None, help="a tiny local model dir (default: train one)")
    parser.add_argument("--width", type=int, default=120)
    parser.add_argument("--height", type=int, default=40)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="detox-shots-") as tmp:
        tmp_path = Path(tmp)
        model_dir = Path(args.model) if args.model else None
        if model_dir is None:
            from detox_tui.tiny import train_insult_model

            print("training a tiny model (about a minute)...")
            model_dir = train_insult_model(tmp_path / "tiny-insult-gpt2")
        home = tmp_path / "home"
        home.mkdir()
        written = asyncio.run(take(model_dir, Path(args.out), (args.width, args.height), home))
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
