"""The results store of a study: one SQLite file, one row per run, every change a transaction.

Row life: ``pending`` → (claim) ``running`` → (commit) ``done`` | (fail) ``failed``. A claim and a commit are each
one ``BEGIN IMMEDIATE`` transaction (WAL journal, ``synchronous=FULL``), so a process killed at any moment leaves
every row either as it was or fully updated — never half-written. A ``running`` row whose worker is gone is
recovered (back to ``pending``) by the next claim: on this host when its process no longer exists (pid, checked
against the process start time so a reused pid does not fool it), on any host when its heartbeat is older than
``stale_after`` seconds. A commit only lands if the committing worker still holds the claim, so a run recovered
from a worker that was merely slow is never recorded twice. Finished runs are never claimed again.

The *grid* (``set_grid``) is the set of keys the study's current spec expands to. Once a sweep has set it, runs that
an earlier version of the spec added and the current one no longer has (a changed budget, a dropped D_f) stay in
the file — nothing is deleted — but are *retired*: never claimed, not returned by ``rows()`` (so never fitted or
advised from) and counted apart (``retired_count``). A store without a grid (a suite's, or one written before grids)
treats every row as current.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import StoreError as StoreError

STATUSES = ("pending", "running", "done", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key       TEXT PRIMARY KEY,
    seq       INTEGER NOT NULL,
    config    TEXT NOT NULL,
    factors   TEXT NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts  INTEGER NOT NULL DEFAULT 0,
    claim     TEXT,
    host      TEXT,
    pid       INTEGER,
    pid_start TEXT,
    heartbeat REAL,
    created   REAL NOT NULL,
    started   REAL,
    finished  REAL,
    seconds   REAL,
    metrics   TEXT,
    error     TEXT
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, seq);
CREATE TABLE IF NOT EXISTS study (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS grid (key TEXT PRIMARY KEY);
"""

# rows of the current grid: every row while no grid is set (the study table has no 'grid' entry)
IN_GRID = ("(NOT EXISTS (SELECT 1 FROM study WHERE name = 'grid') OR key IN (SELECT key FROM grid))")


@dataclass(frozen=True)
class Claim:
    """A run this worker holds: execute ``config``, then ``commit`` or ``fail`` with ``token``."""

    key: str
    config: dict[str, Any]
    factors: dict[str, Any]
    token: str
    attempt: int


@dataclass
class RunRow:
    key: str
    status: str
    attempts: int
    config: dict[str, Any]
    factors: dict[str, Any]
    metrics: dict[str, Any] | None
    error: str | None
    started: float | None
    finished: float | None
    seconds: float | None
    host: str | None
    pid: int | None


def process_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, start: str | None) -> bool:
    """True when ``pid`` runs and (where known) is the same process that started at ``start`` (not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # no /proc: trust kill(0)
    return state != "Z" and (start is None or process_start(pid) == start)


class Store:
    """One study's SQLite file. Safe to use from many processes at once (each opens its own connection)."""

    def __init__(self, path: str | Path, *, create: bool = True, stale_after: float = 300.0) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"no study store at {self.path}; run `tunelab sweep SPEC` first (it creates "
                             f"OUTPUT_DIR/study.sqlite), or give the study folder or its study.sqlite")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stale_after = stale_after
        self.host = socket.gethostname()
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (rolled back on any exception): the unit of every change."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- study ---------------------------------------------------------------------------------------------------
    def set_info(self, name: str, value: Any) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO study (name, value) VALUES (?, ?)", (name, json.dumps(value)))

    def info(self, name: str, default: Any = None) -> Any:
        with self._connect() as db:
            row = db.execute("SELECT value FROM study WHERE name = ?", (name,)).fetchone()
        return json.loads(row["value"]) if row else default

    def add_runs(self, runs: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> int:
        """Insert (key, config, factors) rows not yet present (existing rows keep their status and results;
        their factors — which axes a run belongs to — are refreshed). Returns how many were new."""
        now = time.time()
        with self.transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0]
            before = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            for i, (key, config, factors) in enumerate(runs):
                db.execute(
                    "INSERT INTO runs (key, seq, config, factors, status, created) VALUES (?, ?, ?, ?, 'pending', ?) "
                    "ON CONFLICT (key) DO UPDATE SET factors = excluded.factors",
                    (key, seq + i + 1, json.dumps(config, sort_keys=True), json.dumps(factors), now))
            after = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        return after - before

    def set_grid(self, keys: list[str]) -> None:
        """Make ``keys`` the current grid (one transaction); rows outside it are retired, not deleted."""
        with self.transaction() as db:
            db.execute("DELETE FROM grid")
            db.executemany("INSERT OR IGNORE INTO grid (key) VALUES (?)", [(k,) for k in keys])
            db.execute("INSERT OR REPLACE INTO study (name, value) VALUES ('grid', ?)", (json.dumps(len(keys)),))

    def retired_count(self) -> int:
        """Rows kept from an earlier grid (0 when no grid is set)."""
        with self._connect() as db:
            return int(db.execute(f"SELECT COUNT(*) FROM runs WHERE NOT {IN_GRID}").fetchone()[0])

    # -- claims --------------------------------------------------------------------------------------------------
    def claim(self, prefer: str | None = None) -> Claim | None:
        """Recover stale claims, then take run ``prefer`` if it is pending, else the next pending run (None when
        there is none)."""
        pid = os.getpid()
        token = f"{self.host}:{pid}:{uuid.uuid4().hex[:8]}"
        now = time.time()
        with self.transaction() as db:
            self._recover(db, now)
            row = db.execute("SELECT key, config, factors, attempts FROM runs WHERE status = 'pending' AND "
                             f"{IN_GRID} ORDER BY key != ?, seq LIMIT 1", (prefer,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE runs SET status = 'running', attempts = attempts + 1, claim = ?, host = ?, pid = ?, "
                       "pid_start = ?, heartbeat = ?, started = ?, error = NULL WHERE key = ?",
                       (token, self.host, pid, process_start(pid), now, now, row["key"]))
        return Claim(row["key"], json.loads(row["config"]), json.loads(row["factors"]), token, row["attempts"] + 1)

    def _recover(self, db: sqlite3.Connection, now: float) -> int:
        stale = []
        for r in db.execute("SELECT key, host, pid, pid_start, heartbeat FROM runs WHERE status = 'running'"):
            gone = r["host"] == self.host and not process_alive(r["pid"], r["pid_start"])
            if gone or (r["heartbeat"] or 0) < now - self.stale_after:
                stale.append(r["key"])
        for key in stale:
            db.execute("UPDATE runs SET status = 'pending', claim = NULL, error = ? WHERE key = ?",
                       (f"recovered at {time.ctime(now)}: the worker holding it stopped", key))
        return len(stale)

    def live_holders(self) -> list[tuple[str, str, int]]:
        """(key, host, pid) of the running runs whose worker is alive: on this host by its pid, elsewhere by a
        heartbeat newer than ``stale_after``."""
        now, out = time.time(), []
        with self._connect() as db:
            for r in db.execute("SELECT key, host, pid, pid_start, heartbeat FROM runs WHERE status = 'running'"):
                alive = (process_alive(r["pid"], r["pid_start"]) if r["host"] == self.host
                         else (r["heartbeat"] or 0) >= now - self.stale_after)
                if alive:
                    out.append((r["key"], r["host"], r["pid"]))
        return out

    def recover(self) -> int:
        """Put runs whose workers are gone back to pending now; returns how many."""
        with self.transaction() as db:
            return self._recover(db, time.time())

    def heartbeat(self, claim: Claim) -> bool:
        with self.transaction() as db:
            cur = db.execute("UPDATE runs SET heartbeat = ? WHERE key = ? AND claim = ? AND status = 'running'",
                             (time.time(), claim.key, claim.token))
            return cur.rowcount == 1

    def commit(self, claim: Claim, metrics: dict[str, Any], seconds: float) -> bool:
        """Record a finished run; False (nothing written) when the claim was lost meanwhile."""
        return self._finish(claim, "done", metrics=json.dumps(metrics), seconds=seconds, error=None)

    def fail(self, claim: Claim, error: str, seconds: float) -> bool:
        return self._finish(claim, "failed", metrics=None, seconds=seconds, error=error[-4000:])

    def _finish(self, claim: Claim, status: str, **values: Any) -> bool:
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE runs SET status = ?, metrics = ?, seconds = ?, error = ?, finished = ?, claim = NULL "
                "WHERE key = ? AND claim = ? AND status = 'running'",
                (status, values["metrics"], values["seconds"], values["error"], time.time(), claim.key, claim.token))
            return cur.rowcount == 1

    def import_done(self, key: str, config: dict[str, Any], factors: dict[str, Any], metrics: dict[str, Any],
                    seconds: float | None, finished: float | None = None) -> bool:
        """Record a run finished elsewhere (a ledger's entry) as done: inserted when the store lacks it, or taking
        the place of a pending or failed row. A finished row is kept; a running one is left to its worker.
        Returns whether anything was written."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
            if row is not None and row["status"] in ("done", "running"):
                return False
            if row is None:
                seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0] + 1
                db.execute("INSERT INTO runs (key, seq, config, factors, status, created) "
                           "VALUES (?, ?, ?, ?, 'pending', ?)",
                           (key, seq, json.dumps(config, sort_keys=True), json.dumps(factors), now))
            db.execute("UPDATE runs SET status = 'done', metrics = ?, seconds = ?, finished = ?, error = NULL, "
                       "claim = NULL, host = 'ledger' WHERE key = ?",
                       (json.dumps(metrics), seconds, finished or now, key))
        return True

    def reset_failed(self) -> int:
        with self.transaction() as db:
            return db.execute("UPDATE runs SET status = 'pending' WHERE status = 'failed'").rowcount

    # -- reading -------------------------------------------------------------------------------------------------
    def rows(self, status: str | None = None, *, retired: bool = False) -> list[RunRow]:
        """The current grid's rows (``retired=True``: every row in the file), in the order they were added."""
        where = [w for w in ("status = ?" if status else "", "" if retired else IN_GRID) if w]
        query = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        with self._connect() as db:
            found = db.execute(query, (status,) if status else ()).fetchall()
        return [_row(r) for r in found]

    def counts(self) -> dict[str, int]:
        """Rows of the current grid per status."""
        with self._connect() as db:
            found = dict(db.execute(f"SELECT status, COUNT(*) FROM runs WHERE {IN_GRID} GROUP BY status").fetchall())
        return {s: int(found.get(s, 0)) for s in STATUSES}


def _row(r: sqlite3.Row) -> RunRow:
    return RunRow(key=r["key"], status=r["status"], attempts=r["attempts"], config=json.loads(r["config"]),
                  factors=json.loads(r["factors"]), metrics=json.loads(r["metrics"]) if r["metrics"] else None,
                  error=r["error"], started=r["started"], finished=r["finished"], seconds=r["seconds"],
                  host=r["host"], pid=r["pid"])


def open_study(target: str | Path) -> Store:
    """The store of a study given as its folder, its study.sqlite, or its sweep spec YAML."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml"):
        from tunelab.scaling.spec import load_spec

        path = load_spec(path).store_path
    elif path.is_dir() or path.suffix != ".sqlite":
        path = path / "study.sqlite"
    return Store(path, create=False)


class Heartbeat:
    """Background thread that refreshes a claim's heartbeat every ``every`` seconds while a run executes."""

    def __init__(self, store: Store, claim: Claim, every: float = 15.0) -> None:
        self.store, self.claim, self.every = store, claim, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(sqlite3.Error):
                self.store.heartbeat(self.claim)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
