"""SQLite run store: config, prompts, every generation with its scores and result rows, written as a run goes."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from detox_tui.config import Paths
from detox_tui.errors import UserError
from detox_tui.pipeline.results import (
    check_columns,
    export_files,
    jsonable,
    resolve_format,
    write_text_atomic,
)
from detox_tui.prompts.base import PromptItem

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("running", "finished", "failed", "cancelled")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL,
    summary TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS prompts (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    target TEXT,
    subject TEXT,
    category TEXT,
    toxic TEXT,
    meta TEXT,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    phase TEXT NOT NULL,
    config_key TEXT NOT NULL,
    prompt_idx INTEGER NOT NULL,
    sample_idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    scores TEXT NOT NULL,
    UNIQUE (run_id, phase, config_key, prompt_idx, sample_idx)
);
CREATE TABLE IF NOT EXISTS result_rows (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, tbl, key)
);
CREATE INDEX IF NOT EXISTS generations_run ON generations(run_id, id);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created);
"""


def _dumps(value: Any) -> str:
    return json.dumps(jsonable(value), allow_nan=False, ensure_ascii=False)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar entries of a run summary (nested details stay in get_run)."""
    return {k: v for k, v in summary.items() if v is None or isinstance(v, (str, int, float, bool))}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# The only run ids create_run writes: "20261122-213501-3f2a". Anything else in a store was put there by hand (or by an
# attacker: an id is a default export file name) and is refused when read.
RUN_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{4}")


def is_run_id(value: object) -> bool:
    """Whether ``value`` has the form of a run id this store writes (date-time-4 hex digits)."""
    return isinstance(value, str) and RUN_ID.fullmatch(value) is not None


class RunStore:
    """The run store in one SQLite file (WAL mode), safe to use from worker threads.

    Every call opens its own connection and commits before returning, so whatever a run finished is on disk
    when it crashes or is cancelled, and a second RunStore on the same file sees it at once.
    """

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False) -> None:
        """Open (and create, with its schema) the store at ``path``; ``read_only`` writes nothing at all.

        A read-only store is opened with SQLite's ``mode=ro``, so listing and exporting work on a read-only file or
        folder and on a full disk. A missing store reads as an empty one (and is not created). When the folder is
        read-only and no write-ahead log is left beside the file, SQLite cannot set up WAL reading, so the file is
        read as ``immutable`` (it holds every committed run then); a leftover log that cannot be read is one
        UserError.
        """
        self.path = Path(path).expanduser()
        self.read_only = read_only
        self._lock = (
            threading.Lock()
        )  # serialises this object's writes; SQLite's own locking covers processes
        self._immutable = False  # read-only: opened as immutable (see __init__)
        self._empty = False  # read-only: no store file yet, reads see no runs
        if read_only:
            self._check_read_only()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"Cannot create the run store folder '{self.path.parent}': {exc.strerror or exc}."
            ) from exc
        self._init_schema()

    @classmethod
    def open(cls, data_dir: str | None = None, *, read_only: bool = False) -> RunStore:
        """The store under --data-dir, DETOX_TUI_HOME or the platform data dir (``runs.sqlite``)."""
        return cls(Paths.resolve(data_dir).store_path, read_only=read_only)

    # ------------------------------------------------------------------------------------ connections

    def _read_only_uri(self) -> str:
        uri = f"{self.path.absolute().as_uri()}?mode=ro"
        return uri + "&immutable=1" if self._immutable else uri

    def _open_connection(self) -> sqlite3.Connection:
        if not self.read_only:
            return sqlite3.connect(self.path, timeout=30.0)
        if self._empty:
            conn = sqlite3.connect(":memory:")
            conn.executescript(_SCHEMA)
            return conn
        return sqlite3.connect(self._read_only_uri(), uri=True, timeout=30.0)

    def _check_read_only(self) -> None:
        """Find how this store can be read without writing, and that it is a run store this version reads."""
        try:
            if not self.path.exists():
                self._empty = True
                return
            if self.path.is_dir():
                raise UserError(f"The run store '{self.path}' is a folder, not a SQLite file.")
        except OSError as exc:
            raise UserError(f"Cannot read the run store '{self.path}': {exc.strerror or exc}.") from exc
        while True:
            try:
                conn = sqlite3.connect(self._read_only_uri(), uri=True, timeout=30.0)
                try:
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    tables = {
                        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                    }
                finally:
                    conn.close()
                break
            except sqlite3.OperationalError as exc:
                # WAL reading needs the -shm file, created beside the database; without a writable folder that
                # fails. With no log left, the database file alone is the whole store: read it as immutable.
                if not self._immutable and not self._wal_pending():
                    self._immutable = True
                    continue
                raise UserError(
                    f"Cannot read the run store '{self.path}' without writing to it: {exc}."
                ) from exc
            except sqlite3.DatabaseError as exc:
                raise UserError(
                    f"The run store '{self.path}' is not a readable SQLite database ({exc})."
                ) from exc
        if version > SCHEMA_VERSION:
            raise UserError(
                f"The run store '{self.path}' has schema version {version}, newer than this detox-tui "
                f"understands ({SCHEMA_VERSION}); upgrade detox-tui or use another --data-dir."
            )
        if "runs" not in tables:
            if tables:
                raise UserError(f"'{self.path}' is a SQLite database but not a detox-tui run store.")
            self._empty = True  # created but never written: no runs

    def _wal_pending(self) -> bool:
        """Whether a write-ahead log with content is left beside the store (its commits are not in the file yet)."""
        try:
            return Path(f"{self.path}-wal").stat().st_size > 0
        except FileNotFoundError:
            return False
        except OSError:
            return True

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._open_connection()
        except sqlite3.Error as exc:
            raise UserError(f"Cannot open the run store '{self.path}': {exc}.") from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            yield conn
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise UserError(
                    f"The run store '{self.path}' is not a readable SQLite database ({exc})."
                ) from exc
            if self.read_only:  # listing and exporting fail in one sentence, whatever SQLite says
                raise UserError(f"Cannot read the run store '{self.path}': {exc}.") from exc
            raise
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A connection whose statements commit together when the block ends (rolled back on error)."""
        if self.read_only:
            raise RuntimeError("this RunStore was opened read-only")
        with self._lock, self._connect() as conn:
            with conn:
                yield conn

    def _checked_id(self, run_id: str) -> str:
        """``run_id`` read from the store, refused unless it is an id create_run writes."""
        if not is_run_id(run_id):
            raise UserError(
                f"The run store '{self.path}' holds a run id that detox-tui never writes ({str(run_id)[:80]!r}); "
                "refusing to read a crafted or damaged store."
            )
        return run_id

    def _init_schema(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(
                    f"The run store '{self.path}' has schema version {version}, newer than this detox-tui "
                    f"understands ({SCHEMA_VERSION}); upgrade detox-tui or use another --data-dir."
                )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ------------------------------------------------------------------------------------ writes

    def create_run(self, kind: str, config: Mapping[str, Any], model: str, note: str = "") -> str:
        """Record a new run (status "running") and return its id, e.g. "20261122-213501-3f2a"."""
        return self._insert_run(kind, model, "running", note, _dumps(dict(config)))

    def _insert_run(
        self,
        kind: str,
        model: str,
        status: str,
        note: str,
        config_json: str,
        summary: Mapping[str, Any] | None = None,
        error: str | None = None,
        contents: Mapping[str, Any] | None = None,
    ) -> str:
        """Insert a run under a new unique id (retried on a clash) with, in the same transaction, ``contents``
        (a ``dump_run``'s prompts, rows and generations); its id."""
        for _ in range(20):
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
            now = _now()
            with self._write() as conn:
                try:
                    conn.execute(
                        "INSERT INTO runs (id, kind, model, status, created, updated, note, config, summary, error) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            run_id,
                            kind,
                            model,
                            status,
                            now,
                            now,
                            note,
                            config_json,
                            None if summary is None else _dumps(summary),
                            error,
                        ),
                    )
                except sqlite3.IntegrityError:  # the id is taken (same second and hex digits): draw again
                    continue
                if contents is not None:
                    self._insert_contents(conn, run_id, contents)
            return run_id
        raise RuntimeError("could not allocate a unique run id")

    def add_prompts(self, run_id: str, items: Sequence[PromptItem]) -> None:
        """Record the run's prompts in order (index 0..n-1); replaces prompts already stored at those indices."""
        with self._write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO prompts (run_id, idx, prompt, target, subject, category, toxic, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run_id,
                        i,
                        it.prompt,
                        it.target,
                        it.subject,
                        it.category,
                        it.toxic,
                        _dumps(it.meta or {}),
                    )
                    for i, it in enumerate(items)
                ],
            )
            self._touch(conn, run_id)

    def add_generations(
        self,
        run_id: str,
        phase: str,
        config_key: str,
        prompt_idx: int,
        texts: Sequence[str],
        scores: Mapping[str, Sequence[float]],
        sample_indices: Sequence[int] | None = None,
    ) -> None:
        """Record one prompt's generations with one score per text and attribute (sample index -1 = greedy)."""
        n = len(texts)
        indices = list(range(n)) if sample_indices is None else [int(i) for i in sample_indices]
        if len(indices) != n:
            raise ValueError(f"{n} texts but {len(indices)} sample indices")
        for attr, values in scores.items():
            if len(values) != n:
                raise ValueError(f"{n} texts but {len(values)} '{attr}' scores")
        rows = [
            (
                run_id,
                phase,
                config_key,
                int(prompt_idx),
                indices[i],
                texts[i],
                _dumps({a: float(v[i]) for a, v in scores.items()}),
            )
            for i in range(n)
        ]
        with self._write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO generations "
                "(run_id, phase, config_key, prompt_idx, sample_idx, text, scores) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def add_row(self, run_id: str, table: str, key: str, row: Mapping[str, Any]) -> None:
        """Insert or replace result row ``key`` of ``table`` ("baseline", "edit", "ablation", "side_effects"...)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO result_rows (run_id, tbl, key, data) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (run_id, tbl, key) DO UPDATE SET data = excluded.data",
                (run_id, table, str(key), _dumps(dict(row))),
            )
            self._touch(conn, run_id)

    def set_status(
        self,
        run_id: str,
        status: str,
        summary: Mapping[str, Any] | None = None,
        error: str | None = None,
        *,
        clear_error: bool = False,
    ) -> None:
        """Mark a run running/finished/failed/cancelled; a given summary or error replaces the stored one
        (``clear_error``: the stored error is removed, as when a failed or cancelled run is resumed)."""
        if status not in STATUSES:
            raise ValueError(f"unknown run status '{status}' (use one of {', '.join(STATUSES)})")
        sets, args = ["status = ?", "updated = ?"], [status, _now()]
        if summary is not None:
            sets.append("summary = ?")
            args.append(_dumps(dict(summary)))
        if error is not None:
            sets.append("error = ?")
            args.append(error)
        elif clear_error:
            sets.append("error = NULL")
        with self._write() as conn:
            cur = conn.execute(f"UPDATE runs SET {', '.join(sets)} WHERE id = ?", (*args, run_id))
            if cur.rowcount == 0:
                raise UserError(f"No run with id '{run_id}' in {self.path}.")

    def delete_run(self, run_id: str) -> None:
        """Delete a run and everything recorded for it."""
        rid = self.resolve_id(run_id)
        with self._write() as conn:
            conn.execute("DELETE FROM runs WHERE id = ?", (rid,))

    @staticmethod
    def _touch(conn: sqlite3.Connection, run_id: str) -> None:
        conn.execute("UPDATE runs SET updated = ? WHERE id = ?", (_now(), run_id))

    # ------------------------------------------------------------------------------------ reads

    def resolve_id(self, run_id: str) -> str:
        """The full id of a run given its id or a unique prefix of it."""
        with self._connect() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                return self._checked_id(run_id)
            pattern = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            found = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\' ORDER BY id LIMIT 6", (pattern,)
                )
            ]
        if not run_id or not found:
            raise UserError(f"No run with id '{run_id}' in {self.path}.")
        if len(found) > 1:
            shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
            raise UserError(
                f"The run id prefix '{run_id}' matches several runs ({shown}); give more of the id."
            )
        return self._checked_id(found[0])

    def list_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest runs first: id, kind, model, status, created, updated, n_prompts, n_rows (result rows stored),
        note, error and the summary's scalars."""
        with self._connect() as conn:
            cur = conn.execute(
                "SELECT r.id, r.kind, r.model, r.status, r.created, r.updated, r.note, r.summary, r.error, "
                "(SELECT COUNT(*) FROM prompts p WHERE p.run_id = r.id) AS n_prompts, "
                "(SELECT COUNT(*) FROM result_rows x WHERE x.run_id = r.id) AS n_rows "
                "FROM runs r ORDER BY r.created DESC, r.rowid DESC LIMIT ?",
                (int(limit),),
            )
            rows = cur.fetchall()
        out = []
        for r in rows:
            summary = _loads(r["summary"]) or {}
            out.append(
                {
                    "id": self._checked_id(r["id"]),
                    "kind": r["kind"],
                    "model": r["model"],
                    "status": r["status"],
                    "created": r["created"],
                    "updated": r["updated"],
                    "n_prompts": r["n_prompts"],
                    "n_rows": r["n_rows"],
                    "note": r["note"],
                    "error": r["error"],
                    "summary": _headline(summary),
                }
            )
        return out

    def run_state(self, run_id: str) -> dict[str, Any]:
        """What changes while a run goes, in one cheap query: {"status", "updated", "n_rows", "error"}.

        For following a run that another process (a CLI in another terminal) is writing: poll this and reload the
        rows when ``n_rows`` or ``status`` changes. ``run_id`` is a full id; UserError when there is no such run.
        """
        with self._connect() as conn:
            r = conn.execute(
                "SELECT r.status, r.updated, r.error, "
                "(SELECT COUNT(*) FROM result_rows x WHERE x.run_id = r.id) AS n_rows "
                "FROM runs r WHERE r.id = ?",
                (run_id,),
            ).fetchone()
        if r is None:
            raise UserError(f"No run with id '{run_id}' in {self.path}.")
        return {"status": r["status"], "updated": r["updated"], "n_rows": r["n_rows"], "error": r["error"]}

    def get_run(self, run_id: str) -> dict[str, Any]:
        """A run's id, kind, model, status, times, note, config, summary, error and prompts (id or unique prefix)."""
        rid = self.resolve_id(run_id)
        with self._connect() as conn:
            r = conn.execute("SELECT * FROM runs WHERE id = ?", (rid,)).fetchone()
            prompts = conn.execute("SELECT * FROM prompts WHERE run_id = ? ORDER BY idx", (rid,)).fetchall()
        if r is None:  # deleted between the two queries
            raise UserError(f"No run with id '{run_id}' in {self.path}.")
        return {
            "id": self._checked_id(r["id"]),
            "kind": r["kind"],
            "model": r["model"],
            "status": r["status"],
            "created": r["created"],
            "updated": r["updated"],
            "note": r["note"],
            "config": _loads(r["config"]),
            "summary": _loads(r["summary"]),
            "error": r["error"],
            "prompts": [
                {
                    "idx": p["idx"],
                    "prompt": p["prompt"],
                    "target": p["target"],
                    "subject": p["subject"],
                    "category": p["category"],
                    "toxic": p["toxic"],
                    "meta": _loads(p["meta"]) or {},
                }
                for p in prompts
            ],
        }

    def prompt_items(self, run_id: str) -> list[PromptItem]:
        """The run's prompts as PromptItems, in order."""
        return [
            PromptItem(p["prompt"], p["target"], p["subject"], p["category"], p["toxic"], p["meta"])
            for p in self.get_run(run_id)["prompts"]
        ]

    def tables(self, run_id: str) -> list[str]:
        """The names of the result tables a run has rows in, in the order they were first written."""
        with self._connect() as conn:
            cur = conn.execute(
                "SELECT tbl FROM result_rows WHERE run_id = ? GROUP BY tbl ORDER BY MIN(rowid)", (run_id,)
            )
            return [r[0] for r in cur]

    def rows(self, run_id: str, table: str | None = None) -> list[dict[str, Any]]:
        """The stored result rows of a run (one table or all), in the order they were first written."""
        with self._connect() as conn:
            if table is None:
                cur = conn.execute("SELECT data FROM result_rows WHERE run_id = ? ORDER BY rowid", (run_id,))
            else:
                cur = conn.execute(
                    "SELECT data FROM result_rows WHERE run_id = ? AND tbl = ? ORDER BY rowid",
                    (run_id, table),
                )
            return [json.loads(r[0]) for r in cur]

    def row_keys(self, run_id: str, table: str) -> set[str]:
        """The keys of the rows already stored in ``table`` (what --resume skips)."""
        with self._connect() as conn:
            cur = conn.execute("SELECT key FROM result_rows WHERE run_id = ? AND tbl = ?", (run_id, table))
            return {r[0] for r in cur}

    def generations(self, run_id: str) -> list[dict[str, Any]]:
        """Every generation of a run in the order written: prompt text, phase, config_key, sample_idx, text, scores."""
        with self._connect() as conn:
            cur = conn.execute(
                "SELECT g.prompt_idx, p.prompt, g.phase, g.config_key, g.sample_idx, g.text, g.scores "
                "FROM generations g LEFT JOIN prompts p ON p.run_id = g.run_id AND p.idx = g.prompt_idx "
                "WHERE g.run_id = ? ORDER BY g.id",
                (run_id,),
            )
            return [
                {
                    "prompt_idx": r["prompt_idx"],
                    "prompt": r["prompt"],
                    "phase": r["phase"],
                    "config_key": r["config_key"],
                    "sample_idx": r["sample_idx"],
                    "text": r["text"],
                    "scores": json.loads(r["scores"]),
                }
                for r in cur
            ]

    # ------------------------------------------------------------------------------------ copy between stores

    def dump_run(self, run_id: str) -> dict[str, Any]:
        """Everything stored for a run as plain data (for ``import_run`` into another store): kind, model, status,
        note, config, summary, error, prompts, result rows (table, key, data; in write order) and generations."""
        run = self.get_run(run_id)
        rid = run["id"]
        with self._connect() as conn:
            rows = [
                {"table": r["tbl"], "key": r["key"], "data": json.loads(r["data"])}
                for r in conn.execute(
                    "SELECT tbl, key, data FROM result_rows WHERE run_id = ? ORDER BY rowid", (rid,)
                )
            ]
            gens = [
                {
                    "phase": r["phase"],
                    "config_key": r["config_key"],
                    "prompt_idx": r["prompt_idx"],
                    "sample_idx": r["sample_idx"],
                    "text": r["text"],
                    "scores": json.loads(r["scores"]),
                }
                for r in conn.execute(
                    "SELECT phase, config_key, prompt_idx, sample_idx, text, scores FROM generations "
                    "WHERE run_id = ? ORDER BY id",
                    (rid,),
                )
            ]
        keep = ("kind", "model", "status", "note", "config", "summary", "error", "prompts")
        return {**{k: run[k] for k in keep}, "rows": rows, "generations": gens}

    def import_run(self, dump: Mapping[str, Any], *, config_extra: Mapping[str, Any] | None = None) -> str:
        """Store a ``dump_run`` result as a new run (one transaction: all of it or nothing) and return its id."""
        return self._insert_run(
            dump["kind"],
            dump["model"],
            dump["status"],
            dump.get("note") or "",
            _dumps({**dict(dump["config"] or {}), **dict(config_extra or {})}),
            summary=dump.get("summary"),
            error=dump.get("error"),
            contents=dump,
        )

    @staticmethod
    def _insert_contents(conn: sqlite3.Connection, run_id: str, dump: Mapping[str, Any]) -> None:
        conn.executemany(
            "INSERT INTO prompts (run_id, idx, prompt, target, subject, category, toxic, meta) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    run_id,
                    p["idx"],
                    p["prompt"],
                    p["target"],
                    p["subject"],
                    p["category"],
                    p["toxic"],
                    _dumps(p["meta"] or {}),
                )
                for p in dump["prompts"]
            ],
        )
        conn.executemany(
            "INSERT INTO result_rows (run_id, tbl, key, data) VALUES (?, ?, ?, ?)",
            [(run_id, r["table"], str(r["key"]), _dumps(r["data"])) for r in dump["rows"]],
        )
        conn.executemany(
            "INSERT INTO generations (run_id, phase, config_key, prompt_idx, sample_idx, text, scores) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    run_id,
                    g["phase"],
                    g["config_key"],
                    g["prompt_idx"],
                    g["sample_idx"],
                    g["text"],
                    _dumps(g["scores"]),
                )
                for g in dump["generations"]
            ],
        )

    # ------------------------------------------------------------------------------------ export

    def export(
        self,
        run_id: str,
        path: str | os.PathLike,
        fmt: str | None = None,
        *,
        columns: str = "default",
        overwrite: bool = True,
    ) -> Path:
        """Export a run (see ``export_files``) and return the main file's path."""
        return self.export_files(run_id, path, fmt, columns=columns, overwrite=overwrite)[0]

    def export_files(
        self,
        run_id: str,
        path: str | os.PathLike,
        fmt: str | None = None,
        *,
        columns: str = "default",
        overwrite: bool = True,
    ) -> list[Path]:
        """Export a run: csv/md/tex = its main result table and its summary (csv: a ``.summary.csv`` sidecar),
        json = every table with the run's metadata and a top-level ``summary``, jsonl = one generation per line
        with its scores. ``fmt`` None: from the file's extension. ``overwrite`` False: a UserError, and nothing
        written, when a file to write exists. Returns every file written."""
        fmt = resolve_format(path, fmt)
        check_columns(columns)
        run = self.get_run(run_id)
        rid = run["id"]
        if fmt == "jsonl":
            lines = [_dumps({"run_id": rid, **g}) + "\n" for g in self.generations(rid)]
            return [write_text_atomic(path, "".join(lines), overwrite=overwrite)]
        tables = self.tables(rid)
        main = run["kind"] if run["kind"] in tables else (tables[0] if tables else None)
        rows = self.rows(rid, main) if main else []
        meta = {
            "run_id": rid,
            "kind": run["kind"],
            "model": run["model"],
            "status": run["status"],
            "created": run["created"],
            "note": run["note"],
            "table": main,
            "config": run["config"],
            "summary": run["summary"],
            "other_tables": {t: self.rows(rid, t) for t in tables if t != main},
        }
        return export_files(rows, path, fmt, meta=meta, columns=columns, kind=main, overwrite=overwrite)
