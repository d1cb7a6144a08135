"""The run store and the files the tool writes, under hostile or broken conditions.

A crafted run id never leads a file outside the folder; a read-only store (file, folder, leftover WAL) and a full
disk still list and export; an existing export is replaced only with --force (asked in the app); trace and model
saves are atomic and follow the umask; two processes writing one store both land.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from textual.app import App

from detox_tui.cli import _save_model_atomic, _write_trace, main
from detox_tui.errors import UserError
from detox_tui.pipeline.results import export_file_name
from detox_tui.pipeline.store import RunStore, is_run_id
from detox_tui.prompts.base import PromptItem
from detox_tui.widgets.export_dialog import ExportDialog, ExportRequest

ROOT = Path(__file__).resolve().parents[1]
ITEMS = [PromptItem("People from that town are all"), PromptItem("My coworker is such a")]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line(err: str) -> bool:
    return err.strip().count("\n") == 0 and "Traceback" not in err and err.startswith("error: ")


def _fill(store: RunStore, kind: str = "baseline", tag: str = "") -> str:
    run_id = store.create_run(kind, {"generation": {"seed": 1}, "scoring": {"threshold": 0.5}}, model="tiny")
    store.add_prompts(run_id, ITEMS)
    for i in range(len(ITEMS)):
        store.add_generations(run_id, "before", "", i, [f" a{tag}", f" b{tag}"], {"toxicity": [0.1, 0.7]})
        row = {"idx": i, "prompt": ITEMS[i].prompt, "n": 2, "mean": 0.4, "ci_low": 0.1, "ci_high": 0.7}
        store.add_row(run_id, kind, str(i), {**row, "max": 0.7, "share_above_0.5": 0.5, "share_above": 0.5})
    store.set_status(run_id, "finished", summary={"n_prompts": len(ITEMS), "tag": tag})
    return run_id


def _store_in(data: Path) -> tuple[RunStore, str]:
    store = RunStore(data / "runs.sqlite")
    return store, _fill(store)


# ------------------------------------------------------------------------------------------------ run ids


def _crafted_store(data: Path, bad_id: str) -> None:
    """A store holding one honest run and one whose id was crafted by hand."""
    store, good = _store_in(data)
    with sqlite3.connect(data / "runs.sqlite") as conn:
        conn.execute(
            "INSERT INTO runs (id, kind, model, status, created, updated, config) "
            "SELECT ?, kind, model, status, created, updated, config FROM runs WHERE id = ?",
            (bad_id, good),
        )
        conn.execute(
            "INSERT INTO result_rows (run_id, tbl, key, data) SELECT ?, tbl, key, data FROM result_rows "
            "WHERE run_id = ?",
            (bad_id, good),
        )


@pytest.mark.parametrize("bad_id", ["../../../x", "/tmp/owned", "a\x1b]0;title\x07"])
def test_a_crafted_run_id_is_refused_and_no_file_is_written(tmp_path, capsys, monkeypatch, bad_id):
    data = tmp_path / "data"
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    _crafted_store(data, bad_id)
    monkeypatch.chdir(work)
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    for args in (["export", bad_id], ["runs", "export", bad_id, "-f", "json"], ["runs", "show", bad_id]):
        rc, out, err = _cli(capsys, *args, "--data-dir", str(data))
        assert rc == 2 and _one_line(err) and "never writes" in err, (args, err)
        assert "\x1b" not in err  # the crafted id is shown escaped
    rc, out, err = _cli(capsys, "runs", "list", "--data-dir", str(data))
    assert rc == 2 and _one_line(err) and "never writes" in err
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and "-wal" not in p.name) == [
        p for p in before if "-wal" not in p.name
    ]
    assert not Path("/tmp/owned.csv").exists()


def test_default_export_names_are_one_plain_file_here():
    assert export_file_name("20261122-213501-3f2a", "csv") == "20261122-213501-3f2a.csv"
    for stem in ["../../../x", "/etc/passwd", "..", ".hidden", "-rf", "a/b\\c", "x\x1b[2J", "", "é"]:
        name = export_file_name(stem, "md")
        assert Path(name).name == name and "/" not in name and "\\" not in name, name
        assert (
            not name.startswith((".", "-")) and name.endswith(".md") and name.isascii() and name.isprintable()
        )
    with pytest.raises(UserError):
        export_file_name("x", "exe")


def test_run_ids_the_store_writes_are_valid(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    ids = [store.create_run("baseline", {}, model="m") for _ in range(3)]
    assert all(is_run_id(i) for i in ids)
    assert [r["id"] for r in store.list_runs()] == ids[::-1]
    assert not any(
        is_run_id(x) for x in ["../x", "20261122-213501-3f2a/..", "20261122-213501-3F2A ", 7, None]
    )


def test_export_to_the_default_name_stays_in_the_current_folder(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    _, run_id = _store_in(data)
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(capsys, "export", run_id[:12], "-f", "json", "--data-dir", str(data))
    assert rc == 0, err
    assert json.loads((tmp_path / f"{run_id}.json").read_text())["meta"]["run_id"] == run_id


# ------------------------------------------------------------------------------------------------ --force


def test_export_replaces_an_existing_file_only_with_force(tmp_path, capsys):
    data = tmp_path / "data"
    _, run_id = _store_in(data)
    out = tmp_path / "t.json"
    out.write_text("keep")
    out.chmod(0o640)
    common = ("--data-dir", str(data), "--out", str(out))
    rc, _, err = _cli(capsys, "export", run_id, *common)
    assert rc == 2 and _one_line(err) and "--force" in err and out.read_text() == "keep"
    rc, _, err = _cli(capsys, "runs", "export", run_id, *common, "--force")
    assert rc == 0, err
    assert json.loads(out.read_text())["meta"]["run_id"] == run_id
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # a replaced file keeps its mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "t.json"]  # no temporary file left

    # A CSV export also writes its summary beside the table: an existing summary is not replaced silently either.
    table, summary = tmp_path / "t.csv", tmp_path / "t.summary.csv"
    summary.write_text("keep")
    common = ("--data-dir", str(data), "--out", str(table), "--columns", "all")
    rc, _, err = _cli(capsys, "export", run_id, *common)
    assert rc == 2 and _one_line(err) and "t.summary.csv' already exists" in err and "--force" in err
    assert not table.exists() and summary.read_text() == "keep"  # nothing written when one file cannot be
    rc, _, err = _cli(capsys, "export", run_id, *common, "--force")
    assert rc == 0 and table.exists() and summary.read_text().startswith("key,value")


class DialogHost(App):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.results: list = []

    def on_mount(self) -> None:
        self.push_screen(ExportDialog(self.path), self.results.append)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_export_dialog_asks_before_replacing_the_table_or_its_summary(tmp_path, anyio_backend):
    table = tmp_path / "t.csv"
    (tmp_path / "t.summary.csv").write_text("keep")
    app = DialogHost(str(table))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
        assert app.results == [] and isinstance(app.screen, ExportDialog)
        assert "t.summary.csv exists" in str(app.screen.query_one("#export-warning").render())
        await pilot.press("enter")  # asked once: the second Enter replaces it
        await pilot.pause()
        assert app.results == [ExportRequest(str(table), "csv", "default")]

    table.write_text("keep")
    app = DialogHost(str(table))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
        assert "t.csv and t.summary.csv exist" in str(app.screen.query_one("#export-warning").render())
        await pilot.press("escape")
        await pilot.pause()
        assert app.results == [None] and table.read_text() == "keep"


# ------------------------------------------------------------------------------------------------ atomic writes


def test_trace_out_is_written_atomically_with_the_umask(tmp_path):
    data = {"tokens": ["a", "b"], "scores": [[0.1, 0.2], [0.3, 0.4]], "kind": "hidden"}
    out = tmp_path / "trace.csv"
    old = os.umask(0o027)
    try:
        _write_trace(out, data)
    finally:
        os.umask(old)
    assert out.read_text().splitlines()[0] == "layer,0:a,1:b"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    # A write that fails partway (a score that is not a number) leaves the previous file whole, and no temp file.
    for path in (out, tmp_path / "trace.json"):
        path.write_text("keep")
        broken = {"tokens": ["a"], "scores": [[0.1], [object()]], "kind": "hidden"}
        with pytest.raises((TypeError, ValueError)):
            _write_trace(path, broken)
        assert path.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.csv", "trace.json"]


class _Saves:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail = name, fail

    def save_pretrained(self, folder) -> None:
        Path(folder, self.name).write_text("{}")
        if self.fail:
            raise OSError(28, "No space left on device")


class _FakeLM:
    def __init__(self, tokenizer_fails: bool = False) -> None:
        self.model = _Saves("config.json")
        self.tokenizer = _Saves("tokenizer.json", fail=tokenizer_fails)


def test_save_model_is_atomic_and_follows_the_umask(tmp_path):
    target = tmp_path / "edited"
    with pytest.raises(UserError, match="No space left"):
        _save_model_atomic(_FakeLM(tokenizer_fails=True), target)
    assert list(tmp_path.iterdir()) == []  # no half-saved model (weights without a tokenizer), no temp folder
    old = os.umask(0o022)
    try:
        _save_model_atomic(_FakeLM(), target)
    finally:
        os.umask(old)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "tokenizer.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["edited"]
    with pytest.raises(UserError, match="not empty"):
        _save_model_atomic(_FakeLM(), target)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        _save_model_atomic(_FakeLM(), tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _save_model_atomic(_FakeLM(), empty)
    assert (empty / "tokenizer.json").exists()


def test_apply_delta_save_model_round_trips_a_real_model(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    _save_model_atomic(tiny_lm, tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    name, param = next(iter(tiny_lm.model.state_dict().items()))
    assert (again.state_dict()[name].cpu() == param.cpu()).all()


# ------------------------------------------------------------------------------------------------ read-only store

_NO_OVERRIDE = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


def _as_user(cmd: list[str]) -> list[str]:
    """``cmd`` run so that file permissions apply: root keeps its identity but loses its permission override."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    return _NO_OVERRIDE + cmd


def _detox(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        _as_user([sys.executable, "-m", "detox_tui", *args]),
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def _leave_wal(data: Path) -> str:
    """Write a run from a process that dies without closing: its commits stay in runs.sqlite-wal."""
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store_safety import _fill
        import sqlite3
        from detox_tui.pipeline.store import RunStore
        held = sqlite3.connect({str(data / "runs.sqlite")!r})  # open to the end: no close checkpoints the log
        held.execute("SELECT COUNT(*) FROM runs").fetchone()
        print(_fill(RunStore({str(data / "runs.sqlite")!r}), tag="wal"), flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert (data / "runs.sqlite-wal").stat().st_size > 0
    return out.strip()


def _lock(data: Path) -> None:
    for p in data.iterdir():
        p.chmod(0o444)
    data.chmod(0o555)


@pytest.fixture
def unlock():
    locked: list[Path] = []
    yield locked.append
    for data in locked:
        data.chmod(0o755)
        for p in data.iterdir():
            p.chmod(0o644)


@pytest.mark.parametrize("wal", ["none", "left"])
def test_a_read_only_store_lists_shows_and_exports(tmp_path, wal, unlock):
    data = tmp_path / "data"
    _, run_id = _store_in(data)
    if wal == "left":
        run_id = _leave_wal(data)  # the newest run is only in the log
    out = tmp_path / "out"
    out.mkdir()
    _lock(data)
    unlock(data)
    files = sorted(p.name for p in data.iterdir())
    probe = subprocess.run(_as_user(["touch", str(data / "probe")]), capture_output=True)
    assert probe.returncode != 0, "the test cannot make the folder read-only here"

    listed = _detox(["runs", "list", "--data-dir", str(data), "--json"], out)
    assert listed.returncode == 0, listed.stderr
    assert run_id in [r["id"] for r in json.loads(listed.stdout)["runs"]]
    shown = _detox(["runs", "show", run_id, "--data-dir", str(data)], out)
    assert shown.returncode == 0 and run_id in shown.stdout, shown.stderr
    exported = _detox(["export", run_id, "-f", "json", "--data-dir", str(data)], out)
    assert exported.returncode == 0, exported.stderr
    assert json.loads((out / f"{run_id}.json").read_text())["meta"]["run_id"] == run_id
    # Nothing was created or written in the store's folder.
    assert sorted(p.name for p in data.iterdir()) == files


def test_an_unreadable_leftover_log_is_one_line(tmp_path, unlock):
    data = tmp_path / "data"
    _store_in(data)
    _leave_wal(data)
    (data / "runs.sqlite-shm").unlink()  # a log without its index, in a folder where it cannot be rebuilt
    _lock(data)
    unlock(data)
    listed = _detox(["runs", "list", "--data-dir", str(data)], tmp_path)
    assert listed.returncode == 2 and _one_line(listed.stderr), listed.stderr
    assert "runs.sqlite" in listed.stderr and "unexpected" not in listed.stderr


def test_a_missing_store_lists_nothing_and_is_not_created(tmp_path, capsys):
    data = tmp_path / "nothing-here"
    rc, out, err = _cli(capsys, "runs", "list", "--data-dir", str(data), "--json")
    assert rc == 0 and json.loads(out)["runs"] == []
    rc, out, err = _cli(capsys, "export", "2026", "--data-dir", str(data))
    assert rc == 2 and _one_line(err) and "No run with id '2026'" in err
    assert not data.exists()


def test_a_sqlite_file_that_is_no_run_store_is_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "runs.sqlite") as conn:
        conn.execute("CREATE TABLE other (x)")
    rc, _, err = _cli(capsys, "runs", "list", "--data-dir", str(data))
    assert rc == 2 and _one_line(err) and "not a detox-tui run store" in err
    (data / "runs.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    rc, _, err = _cli(capsys, "runs", "list", "--data-dir", str(data))
    assert rc == 2 and _one_line(err) and "not a readable SQLite database" in err


def test_a_read_only_store_refuses_writes_in_code():
    store = RunStore(Path("/nonexistent/never/runs.sqlite"), read_only=True)
    assert store.list_runs() == [] and not Path("/nonexistent").exists()
    with pytest.raises(RuntimeError, match="read-only"):
        store.create_run("baseline", {}, model="m")


_FULL_DISK = """
set -e
mount -t tmpfs -o size=1m tmpfs "$DISK"
cp "$DATA/runs.sqlite" "$DISK/"
dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null || true
python -m detox_tui runs list --data-dir "$DISK" --json > "$OUT/list.json" 2> "$OUT/list.err" || echo $? > "$OUT/list.rc"
cd "$OUT" && python -m detox_tui export "$RUN" -f json --data-dir "$DISK" 2> "$OUT/export.err" \
    || echo $? > "$OUT/export.rc"
python -m detox_tui export "$RUN" --out "$DISK/t.csv" --data-dir "$DISK" 2> "$OUT/full.err" || echo $? > "$OUT/full.rc"
ls -a "$DISK" > "$OUT/disk.ls"
"""


def test_a_full_disk_still_lists_and_exports_elsewhere(tmp_path):
    """On a full tmpfs (a private mount, where the system lets us make one) the store lists and exports."""
    probe = (
        subprocess.run(["unshare", "-m", "true"], capture_output=True) if shutil.which("unshare") else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot make a private mount namespace here")
    data, disk, out = tmp_path / "data", tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    _, run_id = _store_in(data)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATA": str(data),
        "DISK": str(disk),
        "OUT": str(out),
        "RUN": run_id,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(["unshare", "-m", "sh", "-c", _FULL_DISK], env=env, capture_output=True, text=True)
    if done.returncode != 0 and "mount" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert not (out / "list.rc").exists(), (out / "list.err").read_text()
    assert [r["id"] for r in json.loads((out / "list.json").read_text())["runs"]] == [run_id]
    assert not (out / "export.rc").exists(), (out / "export.err").read_text()
    assert json.loads((out / f"{run_id}.json").read_text())["meta"]["run_id"] == run_id
    # Exporting onto the full disk itself fails in one line, exit 2, and leaves no partial file there.
    assert (out / "full.rc").read_text().strip() == "2"
    full_err = (out / "full.err").read_text()
    assert _one_line(full_err) and "No space left" in full_err
    assert "t.csv" not in (out / "disk.ls").read_text().split()


# ------------------------------------------------------------------------------------------------ concurrency

_WRITER = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_store_safety import _fill
from detox_tui.pipeline.store import RunStore
store = RunStore({path!r})
for i in range({n}):
    _fill(store, tag="{tag}%d" % i)
"""


def _check_store(path: Path, expected: dict[str, int]) -> None:
    store = RunStore(path, read_only=True)
    runs = store.list_runs(limit=1000)
    tags: dict[str, int] = {}
    for r in runs:
        assert r["status"] == "finished" and r["n_prompts"] == 2 and r["n_rows"] == 2
        tags[r["summary"]["tag"][0]] = tags.get(r["summary"]["tag"][0], 0) + 1
        assert len(store.generations(r["id"])) == 4
    assert tags == expected
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_two_processes_writing_one_store_both_land(tmp_path):
    path = tmp_path / "runs.sqlite"
    RunStore(path)  # the schema exists before both start, as after any first run
    n = 15
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER.format(
                    root=str(ROOT), tests=str(Path(__file__).parent), path=str(path), n=n, tag=tag
                ),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("p", "q")
    ]
    for proc in procs:
        _, errors = proc.communicate(timeout=300)
        assert proc.returncode == 0, errors
    _check_store(path, {"p": n, "q": n})


def test_threads_with_their_own_stores_on_one_file_all_land(tmp_path):
    path = tmp_path / "runs.sqlite"
    failures: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            store = RunStore(path)  # each opens (and creates, if first) the store itself
            for i in range(8):
                _fill(store, tag=f"{tag}{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert failures == []
    _check_store(path, {"a": 8, "b": 8, "c": 8})
