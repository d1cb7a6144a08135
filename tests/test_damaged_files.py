"""Files the tool reads back: nothing in them executes, and damage is refused (or, for caches, recomputed).

A crafted Detoxify checkpoint never runs its pickle payload; edit deltas and the AurA expertise cache carry a
checksum and are checked against the model; a model folder without a usable tokenizer, truncated weights, malformed
prompt files, a --save-delta folder and a read-only cache each end in one sentence (or one warning) instead of a
traceback, a wrong result or a silently empty run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from detoxify_fixture import build_tiny_detoxify

from detox_tui.backends.editing.base import DELTA_FORMAT, EditDelta, delta_checksum
from detox_tui.cli import main
from detox_tui.errors import UserError

TINY_RUN = ("--samples", "1", "--max-new-tokens", "2", "--limit", "1", "--device", "cpu")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------- nothing executes


class _CreatesFile:
    """Unpickling this runs open(path, "w"): a stand-in for any payload a crafted checkpoint could carry."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory):
    return build_tiny_detoxify(tmp_path_factory.mktemp("detoxify"), train_steps=0)


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"config": _CreatesFile(marker), "state_dict": {}}, path)
    return path


def _benign_pickle_checkpoint(source: Path, path: Path) -> Path:
    """A legitimate Detoxify checkpoint that also holds an object only pickle can build (a Fraction)."""
    data = torch.load(source, weights_only=True)
    data["config"]["note"] = Fraction(1, 3)
    torch.save(data, path)
    return path


def test_a_crafted_checkpoint_never_runs_its_payload_and_is_refused_in_one_line(
    capsys, tiny_model_dir, tiny_detoxify, tmp_path
):
    _, config_dir = tiny_detoxify
    marker = tmp_path / "payload-ran"
    evil = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    rc, _, err = run_cli(
        capsys,
        "baseline",
        "--model",
        str(tiny_model_dir),
        "--scorer",
        f"detoxify:{evil}@{config_dir}",
        *TINY_RUN,
    )
    assert not marker.exists()
    assert rc == 2
    (line,) = error_lines(err)
    assert str(evil) in line and "pickle" in line and "--trust-checkpoint" in line


def test_the_hub_weights_are_opened_without_pickle_too(tiny_detoxify, tmp_path, monkeypatch):
    from detox_tui.backends.scorers import detoxify_scorer

    marker = tmp_path / "payload-ran"
    evil = _crafted_checkpoint(tmp_path / "toxic_debiased-c7548aa0.ckpt", marker)
    monkeypatch.setattr(detoxify_scorer, "cached_checkpoint_path", lambda variant: evil)
    with pytest.raises(UserError, match="pickle"):
        detoxify_scorer.DetoxifyScorer("unbiased", huggingface_config_path=tiny_detoxify[1])
    assert not marker.exists()


def test_a_legitimate_local_detoxify_checkpoint_still_loads_and_scores(capsys, tiny_model_dir, tiny_detoxify):
    checkpoint, config_dir = tiny_detoxify
    rc, out, err = run_cli(
        capsys,
        "baseline",
        "--model",
        str(tiny_model_dir),
        "--scorer",
        f"detoxify:{checkpoint}@{config_dir}",
        *TINY_RUN,
        "--json",
    )
    assert rc == 0, err
    data = json.loads(out)
    assert data["config"]["scoring"]["trust_checkpoint"] is False
    assert all(0.0 <= row["mean"] <= 1.0 for row in data["rows"])


def test_a_checkpoint_that_needs_pickle_loads_only_with_trust_checkpoint_and_a_warning(
    capsys, caplog, tiny_model_dir, tiny_detoxify, tmp_path
):
    checkpoint, config_dir = tiny_detoxify
    pickled = _benign_pickle_checkpoint(checkpoint, tmp_path / "pickled.ckpt")
    scorer = f"detoxify:{pickled}@{config_dir}"
    rc, _, err = run_cli(capsys, "baseline", "--model", str(tiny_model_dir), "--scorer", scorer, *TINY_RUN)
    assert rc == 2
    (line,) = error_lines(err)
    assert "--trust-checkpoint" in line and str(pickled) in line

    with caplog.at_level(logging.WARNING):
        rc, out, err = run_cli(
            capsys,
            "--trust-checkpoint",
            "baseline",
            "--model",
            str(tiny_model_dir),
            "--scorer",
            scorer,
            *TINY_RUN,
            "--json",
        )
    assert rc == 0, err
    assert json.loads(out)["config"]["scoring"]["trust_checkpoint"] is True
    warnings = [r.getMessage() for r in caplog.records if "pickle" in r.getMessage()]
    assert len(warnings) == 1 and str(pickled) in warnings[0] and "\n" not in warnings[0]


@pytest.mark.parametrize("content", [b"not a checkpoint", b""], ids=["garbage", "empty"])
def test_a_damaged_checkpoint_is_one_sentence(tmp_path, tiny_detoxify, content):
    from detox_tui.backends.scorers import load_scorer

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(UserError, match="damaged or not a PyTorch checkpoint") as info:
        load_scorer(f"detoxify:{bad}@{tiny_detoxify[1]}")
    assert str(bad) in str(info.value)


def test_a_truncated_detoxify_checkpoint_is_one_sentence(tmp_path, tiny_detoxify):
    from detox_tui.backends.scorers import load_scorer

    checkpoint, config_dir = tiny_detoxify
    data = checkpoint.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged or not a PyTorch checkpoint"):
        load_scorer(f"detoxify:{cut}@{config_dir}")


def test_a_checkpoint_naming_a_class_that_is_not_a_classifier_is_refused(tmp_path, tiny_detoxify):
    from detox_tui.backends.scorers import load_scorer

    checkpoint, config_dir = tiny_detoxify
    data = torch.load(checkpoint, weights_only=True)
    data["config"]["arch"]["args"]["model_name"] = "AutoModel"
    odd = tmp_path / "odd.ckpt"
    torch.save(data, odd)
    with pytest.raises(UserError, match="not a sequence classification model class"):
        load_scorer(f"detoxify:{odd}@{config_dir}")


# ------------------------------------------------------------------------------------------- edit deltas

PARAM = "transformer.h.1.mlp.c_proj.weight"


@pytest.fixture
def saved_delta(tiny_lm, tmp_path) -> Path:
    param = dict(tiny_lm.model.named_parameters())[PARAM]
    gen = torch.Generator().manual_seed(0)
    delta = EditDelta({PARAM: 0.05 * torch.randn(param.shape, generator=gen)}, "memit", tiny_lm.name, [1])
    return delta.save(tmp_path / "edit.safetensors")


def _write_delta(path: Path, tensors: dict[str, torch.Tensor], header: object, checksum: bool = True) -> Path:
    """A delta file written by hand: any header, with a correct checksum unless ``checksum`` is False."""
    from safetensors.torch import save_file

    header_json = header if isinstance(header, str) else json.dumps(header)
    meta = {"detox_tui": header_json}
    if checksum:
        meta["checksum"] = delta_checksum(header_json, tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


_DROP = object()  # a _header() value that leaves the field out


def _header(**changes) -> dict:
    header = {
        "format": DELTA_FORMAT,
        "method": "memit",
        "model": "tiny",
        "layers": [1],
        "hparams": {},
        "requests": [],
        "info": {},
    }
    header.update(changes)
    return {k: v for k, v in header.items() if v is not _DROP}


def test_a_saved_delta_round_trips_and_applies(tiny_lm, saved_delta):
    loaded = EditDelta.load(saved_delta)
    before = dict(tiny_lm.model.named_parameters())[PARAM].detach().clone()
    with loaded.applied_to(tiny_lm.model):
        assert not torch.equal(dict(tiny_lm.model.named_parameters())[PARAM], before)
    assert torch.equal(dict(tiny_lm.model.named_parameters())[PARAM], before)


def test_a_delta_with_any_one_flipped_byte_is_refused(saved_delta, tmp_path):
    data = saved_delta.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    # Bytes of the safetensors header (our JSON header and checksum inside it) and of the tensor data.
    offsets = sorted(
        {*range(8, header_end, max(1, (header_end - 8) // 40)), header_end, len(data) // 2, len(data) - 1}
    )
    for offset in offsets:
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        path = tmp_path / f"flipped-{offset}.safetensors"
        path.write_bytes(bytes(damaged))
        with pytest.raises(UserError) as info:
            EditDelta.load(path)
        assert str(path) in str(info.value), offset


def test_a_flipped_data_byte_fails_the_checksum_in_one_line_through_apply_delta(
    capsys, tiny_model_dir, saved_delta, tmp_path
):
    data = bytearray(saved_delta.read_bytes())
    data[-5] ^= 0x10
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    rc, out, err = run_cli(
        capsys, "apply-delta", str(flipped), "--model", str(tiny_model_dir), "--device", "cpu"
    )
    assert rc == 2 and "applied" not in out
    (line,) = error_lines(err)
    assert "checksum" in line and str(flipped) in line


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_delta_with_non_finite_values_is_refused(tiny_lm, tmp_path, value):
    param = dict(tiny_lm.model.named_parameters())[PARAM]
    values = torch.zeros(param.shape)
    values[3, 4] = value
    path = EditDelta({PARAM: values}, "memit", tiny_lm.name, [1]).save(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="NaN or infinite") as info:
        EditDelta.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (_header(layers="1,2"), "'layers' must be a list of layer numbers"),
        (_header(layers=[1, True]), "'layers' must be a list of layer numbers"),
        (_header(method=7), "'method' must be a method name"),
        (_header(requests=_DROP), "has no 'requests'"),
        (_header(hparams=[]), "'hparams' must be an object"),
        (_header(format="something-else/9"), "unknown format"),
        ("[1, 2]", "not an object"),
        ('{"format": ', "not valid JSON"),
    ],
    ids=[
        "layers-text",
        "layers-bool",
        "method",
        "no-requests",
        "hparams",
        "format",
        "not-object",
        "not-json",
    ],
)
def test_a_delta_with_a_bad_header_is_refused(tmp_path, header, expected):
    path = _write_delta(tmp_path / "bad.safetensors", {PARAM: torch.zeros(4, 4)}, header)
    with pytest.raises(UserError, match=expected) as info:
        EditDelta.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_delta_with_no_tensors_is_refused_not_reported_as_applied(capsys, tiny_model_dir, tmp_path):
    path = EditDelta({}, "memit", str(tiny_model_dir), [1]).save(tmp_path / "empty.safetensors")
    rc, out, err = run_cli(
        capsys, "apply-delta", str(path), "--model", str(tiny_model_dir), "--device", "cpu"
    )
    assert rc == 2 and "applied" not in out
    (line,) = error_lines(err)
    assert "holds no tensors" in line and str(path) in line


def test_a_delta_without_a_checksum_is_refused_in_the_current_format(tmp_path):
    path = _write_delta(
        tmp_path / "unsigned.safetensors", {PARAM: torch.zeros(4, 4)}, _header(), checksum=False
    )
    with pytest.raises(UserError, match="failed its checksum"):
        EditDelta.load(path)


def test_an_older_delta_without_checksum_still_loads_with_a_warning(tmp_path, caplog):
    header = _header(format="detox-tui-edit-delta/1")
    path = _write_delta(tmp_path / "old.safetensors", {PARAM: torch.ones(4, 4)}, header, checksum=False)
    with caplog.at_level(logging.WARNING):
        loaded = EditDelta.load(path)
    assert torch.equal(loaded.deltas[PARAM], torch.ones(4, 4)) and loaded.layers == [1]
    assert any("no checksum" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_apply_delta_with_the_wrong_shape_prints_one_line(capsys, tiny_model_dir, tmp_path):
    path = EditDelta({PARAM: torch.zeros(3, 5)}, "memit", "another-model", [1]).save(
        tmp_path / "w.safetensors"
    )
    rc, out, err = run_cli(
        capsys, "apply-delta", str(path), "--model", str(tiny_model_dir), "--device", "cpu"
    )
    assert rc == 2 and out == ""
    (line,) = error_lines(err)
    assert str(path) in line and "(3, 5)" in line and "(256, 64)" in line


# ------------------------------------------------------------------------------------ AurA expertise cache

TOXIC = ["you are an idiot", "shut up, you stupid fool", "what a worthless moron"]
NONTOXIC = ["the river runs by the old mill", "we had soup for lunch", "the train leaves at noon"]


def _cache_file(cache_dir: Path) -> Path:
    (path,) = (cache_dir / "aura").glob("*.safetensors")
    return path


def _rewrite_cache(path: Path, change) -> None:
    """Rewrite the cache file with ``change`` applied to its tensors and a matching checksum: only the content
    checks (shape, finite values) can catch it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    meta["checksum"] = delta_checksum(meta["detox_tui"], tensors)
    save_file(tensors, str(path), metadata=meta)


def _first(tensors):
    return sorted(tensors)[0]


def _nan(tensors):
    tensors[_first(tensors)][0] = math.nan


def _wrong_shape(tensors):
    key = _first(tensors)
    tensors[key] = tensors[key][:-1].clone()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x04
    path.write_bytes(bytes(data))


def _other_model(path: Path) -> None:
    _rewrite_header(path, model="someone-else/model@x")


def _rewrite_header(path: Path, **changes) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["detox_tui"])
    header.update(changes)
    meta["detox_tui"] = json.dumps(header, sort_keys=True)
    meta["checksum"] = delta_checksum(meta["detox_tui"], tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: _rewrite_cache(p, _nan), "NaN or infinite"),
        (lambda p: _rewrite_cache(p, _wrong_shape), "has shape"),
        (_flip_byte, "checksum"),
        (_other_model, "another model"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "damaged or truncated"),
    ],
    ids=["nan", "wrong-shape", "flipped-byte", "other-model", "truncated"],
)
def test_a_damaged_aura_cache_is_never_used_it_is_recomputed_with_a_warning(
    tiny_lm, tmp_path, caplog, damage, reason
):
    from detox_tui.backends.editing.aura import cached_expertise

    fresh, hit = cached_expertise(tiny_lm, TOXIC, NONTOXIC, tmp_path)
    assert not hit
    path = _cache_file(tmp_path)
    damage(path)
    with caplog.at_level(logging.WARNING):
        again, hit = cached_expertise(tiny_lm, TOXIC, NONTOXIC, tmp_path)
    assert not hit
    assert set(again) == set(fresh) and all(torch.equal(again[k], fresh[k]) for k in fresh)
    (warning,) = [r.getMessage() for r in caplog.records if "AurA expertise cache" in r.getMessage()]
    assert str(path) in warning and reason in warning
    # The recomputed entry was written back whole: the next call is a clean hit.
    caplog.clear()
    _, hit = cached_expertise(tiny_lm, TOXIC, NONTOXIC, tmp_path)
    assert hit and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert os.path.getsize(path) > 1000


# -------------------------------------------------------------------------------------------- model folders


def _model_copy(source: Path, dest: Path, leave_out: tuple[str, ...] = ()) -> Path:
    dest.mkdir()
    for f in source.iterdir():
        if f.is_file() and f.name not in leave_out:
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_a_model_folder_without_its_tokenizer_is_refused_before_generating(capsys, tiny_model_dir, tmp_path):
    folder = _model_copy(
        tiny_model_dir, tmp_path / "no-tokenizer", ("tokenizer.json", "tokenizer_config.json")
    )
    rc, out, err = run_cli(capsys, "baseline", "--model", str(folder), "--scorer", "profanity", *TINY_RUN)
    assert rc == 2 and out == ""
    (line,) = error_lines(err)
    assert str(folder) in line and "tokenizer" in line
    from detox_tui.pipeline.store import RunStore

    assert RunStore.open(os.environ["DETOX_TUI_HOME"]).list_runs() == []


def test_a_tokenizer_of_another_model_is_refused(tiny_lm, tmp_path):
    from detox_tui.backends.models import check_token_ids, check_tokenizer

    ids = check_tokenizer("tiny", tiny_lm.tokenizer)
    tiny_lm.model.resize_token_embeddings(max(ids))  # the tokenizer now names rows the model lacks
    with pytest.raises(UserError, match="does not match the model"):
        check_token_ids("tiny", ids, tiny_lm.model)


@pytest.mark.parametrize("command", ["baseline", "apply-delta"])
def test_truncated_model_weights_are_one_line_and_exit_2(
    capsys, tiny_model_dir, tmp_path, saved_delta, command
):
    folder = _model_copy(tiny_model_dir, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if command == "baseline":
        args = ["baseline", "--model", str(folder), "--scorer", "profanity", *TINY_RUN]
    else:
        args = ["apply-delta", str(saved_delta), "--model", str(folder), "--device", "cpu"]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2
    (line,) = error_lines(err)
    assert "damaged or truncated" in line and str(folder) in line


def test_pickled_model_weights_never_run_and_are_refused(capsys, tiny_model_dir, tmp_path, saved_delta):
    from safetensors.torch import load_file

    folder = _model_copy(tiny_model_dir, tmp_path / "pickled", ("model.safetensors",))
    marker = tmp_path / "payload-ran"
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    torch.save({**state, "payload": _CreatesFile(marker)}, folder / "pytorch_model.bin")
    rc, _, err = run_cli(capsys, "apply-delta", str(saved_delta), "--model", str(folder), "--device", "cpu")
    assert not marker.exists()
    assert rc == 2
    (line,) = error_lines(err)
    assert "pickle" in line and str(folder) in line


# -------------------------------------------------------------------------------------------- prompt files


def _prompt_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_csv_quote_that_is_never_closed_is_refused_naming_its_line(tmp_path):
    from detox_tui.prompts import load_prompts

    path = _prompt_file(tmp_path, "q.csv", 'prompt,target\nfine, ok\n"broken, quote\nnext, row\nlast, row\n')
    with pytest.raises(UserError, match=r"q\.csv line 3: a quoted cell .* is never closed\.$"):
        load_prompts(path)


def test_csv_text_after_a_closing_quote_is_refused_naming_its_line(tmp_path):
    from detox_tui.prompts import load_prompts

    path = _prompt_file(tmp_path, "t.csv", 'prompt\nfine\n"half"quoted\n')
    with pytest.raises(UserError, match=r"t\.csv line 3: malformed CSV"):
        load_prompts(path)


def test_a_csv_column_named_twice_is_refused(tmp_path):
    from detox_tui.prompts import load_prompts

    path = _prompt_file(tmp_path, "d.csv", "prompt,target,prompt\nfirst,t,second\n")
    with pytest.raises(UserError, match=r"d\.csv line 1: the column 'prompt' appears twice"):
        load_prompts(path)


def test_strict_csv_still_reads_quoted_commas_newlines_and_short_rows(tmp_path):
    from detox_tui.prompts import load_prompts

    text = 'prompt,target,category\n"Hello, there",world,a\n"two\nlines",x\n\nlast,\n'
    items = load_prompts(_prompt_file(tmp_path, "ok.csv", text))
    assert [(i.prompt, i.target, i.category) for i in items] == [
        ("Hello, there", " world", "a"),
        ("two\nlines", " x", None),
        ("last", None, None),
    ]
    # A bad row after a multi-line cell is named by the line its record starts on.
    text = 'prompt,target\n"two\nlines",x\nfine,ok,extra\n'
    with pytest.raises(UserError, match=r"line 4: the row has more cells than the header"):
        load_prompts(_prompt_file(tmp_path, "more.csv", text))


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (
            "deep.jsonl",
            '{"prompt": "hi", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
            "line 1: the JSON is nested",
        ),
        ("meta.json", '[{"prompt": "hi", "x": ' + "[" * 500 + "]" * 500 + "}]", "nested more than"),
    ],
    ids=["json", "jsonl", "deep-meta"],
)
def test_a_deeply_nested_json_prompt_file_is_one_line_and_exit_2(capsys, tmp_path, name, text, expected):
    path = _prompt_file(tmp_path, name, text)
    rc, _, err = run_cli(capsys, "baseline", "--prompts", path, "--scorer", "profanity", "--model", "m")
    assert rc == 2
    (line,) = error_lines(err)
    assert expected in line and name in line


# ------------------------------------------------------------------------------------ --save-delta and caches


def test_save_delta_naming_an_existing_folder_is_refused_before_any_work(capsys, tmp_path):
    folder = tmp_path / "deltas"
    folder.mkdir()
    rc, out, err = run_cli(capsys, "edit", "--model", "no-such-model", "--save-delta", str(folder))
    assert rc == 2 and out == ""
    (line,) = error_lines(err)
    assert f"--save-delta '{folder}' is a folder" in line and str(folder / "edit.safetensors") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deltas"] and not any(folder.iterdir())


def _unwritable_stats_cache() -> Path:
    """Make the statistics cache folder impossible to create (a file in its place: root ignores permissions)."""
    cache = Path(os.environ["DETOX_TUI_HOME"]) / "cache"
    cache.mkdir(parents=True)
    (cache / "stats").write_text("in the way")
    return cache / "stats"


@pytest.mark.parametrize("command", ["stats", "edit"])
def test_an_unwritable_cache_folder_is_one_warning_and_the_statistics_are_still_used(
    capsys, caplog, tiny_model_dir, command
):
    stats_dir = _unwritable_stats_cache()
    common = ["--model", str(tiny_model_dir), "--layers", "1,2", "--stats-tokens", "300", "--device", "cpu"]
    if command == "stats":
        args = ["stats", *common, "--json"]
    else:
        args = ["edit", *common, "--method", "memit", "--scorer", "profanity", "--samples", "1"]
        args += ["--max-new-tokens", "2", "--limit", "1", "-H", "n_templates=1", "--json"]
    with caplog.at_level(logging.WARNING):
        rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    data = json.loads(out)
    if command == "stats":
        assert data["layers"] == [1, 2] and data["tokens"] > 0
    else:
        assert len(data["rows"]) == 1 and data["deltas"] == []
    (warning,) = [r.getMessage() for r in caplog.records if "could not cache" in r.getMessage()]
    assert "layers 1, 2" in warning and str(stats_dir) in warning and "used for this run only" in warning


@pytest.mark.anyio
@pytest.mark.parametrize("trust", [False, True], ids=["refused", "trusted"])
async def test_the_app_follows_trust_checkpoint_for_a_scorer_that_needs_pickle(
    tiny_model_dir, tiny_detoxify, tmp_path, trust
):
    """`detox-tui --trust-checkpoint` reaches the app: without it the pickled checkpoint is refused (the app says
    why and traces still work), with it the scorer loads."""
    from app_harness import wait_for

    from detox_tui.app import DetoxApp

    checkpoint, config_dir = tiny_detoxify
    pickled = _benign_pickle_checkpoint(checkpoint, tmp_path / "pickled.ckpt")
    app = DetoxApp(
        model=str(tiny_model_dir),
        scorer=f"detoxify:{pickled}@{config_dir}",
        device="cpu",
        dtype="float32",
        trust_checkpoint=trust,
    )
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(
            pilot, lambda: app.workbench is not None or app.load_error is not None, 90, "the model"
        )
        assert app.load_error is None
        if trust:
            assert app.workbench.scorer is not None and app.workbench.scorer_error is None
        else:
            assert app.workbench.scorer is None and "--trust-checkpoint" in app.workbench.scorer_error


@pytest.fixture
def anyio_backend():
    return "asyncio"
