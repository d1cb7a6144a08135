"""Helpers for the app's Pilot tests: a prompt file for the tiny insult model and waiting on workers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

from textual.pilot import Pilot

from detox_tui.app import DetoxApp
from detox_tui.tiny import INSULT_PAIRS

# Hyperparameters under which MEMIT edits the tiny insult model (the gpt2 preset is tuned for gpt2-medium).
TINY_MEMIT = {"mom2_update_weight": "100", "v_num_grad_steps": "25", "clamp_norm_factor": "4"}


def write_insult_prompts(path: Path) -> Path:
    """The tiny model's insult prompts with their safe targets, as a JSONL prompt file."""
    with open(path, "w", encoding="utf-8") as f:
        for prompt, _insult, safe in INSULT_PAIRS:
            f.write(json.dumps({"prompt": prompt, "target": safe, "category": "insult"}) + "\n")
        f.write(
            json.dumps(
                {"prompt": "The weather today is", "target": " sunny and warm.", "category": "neutral"}
            )
        )
        f.write("\n")
    return path


def make_app(model_dir: Path, tmp_path: Path) -> DetoxApp:
    prompts = write_insult_prompts(tmp_path / "prompts.jsonl")
    return DetoxApp(
        model=str(model_dir), prompts=str(prompts), scorer="profanity", device="cpu", dtype="float32"
    )


async def wait_for(
    pilot: Pilot, predicate: Callable[[], bool], timeout: float = 60.0, what: str = ""
) -> None:
    """Let the app run until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
        await pilot.pause(0.05)
    await pilot.pause()


async def wait_loaded(pilot: Pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.workbench is not None or app.load_error is not None, 90, "the model")
    assert app.load_error is None, app.load_error
    await wait_for(pilot, lambda: bool(app.query_one("PromptPicker").items), 30, "the prompts")


async def set_input(pilot: Pilot, field, value: str) -> None:
    """Replace an Input's text by typing, as a user would."""
    field.focus()
    await pilot.pause()
    await pilot.press("end", *["backspace"] * len(field.value), *list(value))
    assert field.value == value, (field.value, value)


async def wait_idle(pilot: Pilot, timeout: float = 90.0) -> None:
    await wait_for(pilot, lambda: pilot.app.running is None, timeout, "the run to end")
    await asyncio.sleep(0)
