"""Loading the workbench component by component: a scorer that fails does not take the model down; errors name the
component; device memory for a status bar."""

from __future__ import annotations

import types

import pytest
import torch

from detox_tui.backends import models
from detox_tui.backends.models import device_memory
from detox_tui.config import ExperimentConfig, GenerationConfig, ModelConfig, ScoringConfig
from detox_tui.errors import UserError
from detox_tui.pipeline.experiment import Workbench, run_ablation, run_baseline, run_edit
from detox_tui.prompts.base import PromptItem

BOGUS = "no-such-scorer"
ITEMS = [PromptItem("People from that town are all", target=" kind")]


def config(model: str, scorer: str) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(name=model, device="cpu", dtype="float32"),
        generation=GenerationConfig(samples=2, max_new_tokens=4, seed=0),
        scoring=ScoringConfig(scorer=scorer),
    )


def test_a_scorer_that_fails_leaves_a_working_model_and_names_itself(tiny_model_dir, tmp_path):
    wb = Workbench.load(config(str(tiny_model_dir), BOGUS), data_dir=str(tmp_path), scorer="optional")
    assert wb.scorer is None
    assert wb.scorer_error.startswith(f"The scorer '{BOGUS}' did not load: ")
    assert wb.scorer_error.endswith(".") and "\n" not in wb.scorer_error
    with torch.no_grad():  # the model works
        ids = wb.lm.tokenizer("hello there", return_tensors="pt")["input_ids"]
        assert torch.isfinite(wb.lm.model(input_ids=ids).logits).all()

    # Runs that score refuse to start, saying why and what to do, and store nothing.
    for start in (
        lambda: run_baseline(wb, ITEMS, wb.config),
        lambda: run_edit(wb, ITEMS, config(str(tiny_model_dir), BOGUS)),
        lambda: run_ablation(wb, ITEMS, config(str(tiny_model_dir), BOGUS), [[1]]),
    ):
        with pytest.raises(UserError) as info:
            start()
        message = str(info.value)
        assert message.startswith("No scorer is loaded") and BOGUS in message
        assert message.endswith("; choose a scorer in Settings or pass --scorer.")
    assert wb.store.list_runs() == []

    # Another scorer that fails keeps the state as it was.
    with pytest.raises(UserError, match=r"^The scorer 'hf:' did not load: "):
        wb.set_scorer("hf:")
    assert wb.scorer is None and BOGUS in wb.scorer_error

    wb.set_scorer("profanity")
    assert wb.scorer is not None and wb.scorer.name == "profanity"
    assert wb.scorer_error is None and wb.config.scoring.scorer == "profanity"
    result = run_baseline(wb, ITEMS, wb.config)
    assert wb.store.get_run(result.run_id)["status"] == "finished"
    assert result.summary["scorer"] == "profanity" and result.rows[0]["n"] == 2


def test_set_scorer_that_fails_keeps_the_scorer_in_use(tiny_model_dir, tmp_path):
    wb = Workbench.load(config(str(tiny_model_dir), "profanity"), data_dir=str(tmp_path))
    before = wb.scorer
    with pytest.raises(UserError, match=rf"^The scorer '{BOGUS}' did not load: .+\.$"):
        wb.set_scorer(BOGUS)
    assert wb.scorer is before and wb.config.scoring.scorer == "profanity"


def test_scorer_modes(tiny_model_dir, tmp_path):
    cfg = config(str(tiny_model_dir), BOGUS)
    with pytest.raises(UserError, match=BOGUS):  # required: as before
        Workbench.load(cfg, data_dir=str(tmp_path))
    wb = Workbench.load(cfg, data_dir=str(tmp_path), scorer="none")
    assert wb.scorer is None and wb.scorer_error is None
    with pytest.raises(UserError, match=r"^No scorer is loaded; choose a scorer"):
        run_baseline(wb, ITEMS, cfg)
    with pytest.raises(ValueError):
        Workbench.load(cfg, data_dir=str(tmp_path), scorer="sometimes")


@pytest.mark.parametrize("scorer", ["optional", "none", "required"])
def test_a_missing_model_is_a_user_error_naming_the_model(tmp_path, scorer):
    missing = str(tmp_path / "no-model-here")
    with pytest.raises(UserError, match=r"^The model '.*no-model-here' did not load: .+\.$"):
        Workbench.load(config(missing, "profanity"), data_dir=str(tmp_path), scorer=scorer)


def test_model_failures_from_the_libraries_name_the_model(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered\nmore detail")

    monkeypatch.setattr("detox_tui.pipeline.experiment.load_model", broken)
    with pytest.raises(UserError) as info:
        Workbench.load(config("some/model", "profanity"), data_dir=str(tmp_path), scorer="optional")
    assert str(info.value) == "The model 'some/model' did not load: CUDA error: device-side assert triggered."


# ------------------------------------------------------------------------------------------ device memory


def test_device_memory_is_none_off_cuda():
    assert device_memory(torch.device("cpu")) is None
    assert device_memory("cpu") is None
    assert device_memory("mps") is None
    assert device_memory(None) is None
    assert device_memory("not a device") is None  # never raises


def _fake_cuda(monkeypatch, allocated: int, peak: int, total: int) -> list:
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "memory_allocated", lambda i=None: calls.append(("allocated", i)) or allocated
    )
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=None: calls.append(("peak", i)) or peak)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=total)
    )
    return calls


def test_device_memory_reads_the_cuda_counters(monkeypatch):
    calls = _fake_cuda(monkeypatch, allocated=3 << 30, peak=5 << 30, total=80 << 30)
    monkeypatch.setitem(models._NVML, "module", None)  # no NVML: no utilisation
    info = device_memory(torch.device("cuda", 1))
    assert info == {"allocated": 3 << 30, "peak": 5 << 30, "total": 80 << 30, "utilisation": None}
    assert ("allocated", 1) in calls and ("peak", 1) in calls
    assert device_memory("cuda")["total"] == 80 << 30  # no index: the current device

    # With NVML, its utilisation; an NVML failure is no utilisation, never an error.
    nvml = types.SimpleNamespace(
        nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42),
    )
    monkeypatch.setitem(models._NVML, "module", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_memory("cuda:0")["utilisation"] == 42

    def nvml_error(handle):
        raise OSError("NVML went away")

    monkeypatch.setattr(nvml, "nvmlDeviceGetUtilizationRates", nvml_error)
    assert device_memory("cuda:0")["utilisation"] is None


def test_device_memory_never_raises_when_cuda_does(monkeypatch):
    _fake_cuda(monkeypatch, 1, 1, 1)

    def boom(i=None):
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "memory_allocated", boom)
    assert device_memory("cuda:0") is None
