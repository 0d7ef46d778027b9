"""A study's finished runs as plain JSON files, one per run, in a folder meant to be committed with the results.

A store (``study.sqlite``) lives beside the run folders, outside the repository, and goes when the machine goes;
a ledger is what survives it. Every finished run of a study that has one is written there as it finishes
(``runs/<key>.json``: key, factors, metrics, seconds, config, and the result files the study's report reads, as
text under their paths relative to the study folder — atomically), and a study opened with a ledger first
imports every run the ledger has and the store lacks as finished (writing its files back into the study folder),
and writes every finished run the store has and the ledger lacks. So a study continued on a fresh machine from a
clone — the same command with the same ``--ledger`` and an empty ``--out`` — trains nothing that finished before,
and its report is built from the same results.

``ledger.json`` holds the study's *fingerprint*: what a run's key does not say but its result depends on (for a
suite: its name, training steps, test limit and the digest of the training and dev records). A ledger is refused by
a study with another fingerprint, since its results would be taken for runs that were never made.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from tunelab.errors import StoreError
from tunelab.files import atomic_write_json, atomic_write_text
from tunelab.scaling.store import RunRow, Store

VERSION = 1


def file_name(key: str) -> str:
    """A run key as a portable file name: '/' becomes '__' and anything outside [A-Za-z0-9.=%+-] (so also '_'
    and '~') becomes '~XX' per byte, so distinct keys give distinct names."""
    escaped = re.sub(r"[^A-Za-z0-9.=%+/-]", lambda m: "".join(f"~{b:02x}" for b in m.group().encode()), key)
    return escaped.replace("/", "__") + ".json"


def digest(*paths: Path) -> str:
    """sha256 of the files' bytes, in order (what a fingerprint records of a study's data)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


class Ledger:
    def __init__(self, folder: str | Path, fingerprint: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        head = self.folder / "ledger.json"
        if head.is_file():
            try:
                have = json.loads(head.read_text())
            except (OSError, ValueError) as err:
                raise StoreError(f"{head}: not a ledger header ({err})") from None
            if have.get("fingerprint") != self.fingerprint:
                raise StoreError(f"{head}: this ledger belongs to another study: its fingerprint is "
                                 f"{json.dumps(have.get('fingerprint'), sort_keys=True)}, this study's is "
                                 f"{json.dumps(self.fingerprint, sort_keys=True)}. Give this study its own "
                                 "--ledger folder")
        else:
            atomic_write_json(head, {"version": VERSION, "fingerprint": self.fingerprint})

    def path(self, key: str) -> Path:
        return self.folder / "runs" / file_name(key)

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted((self.folder / "runs").glob("*.json")):
            try:
                entry = json.loads(p.read_text())
                entry["key"], entry["metrics"]  # noqa: B018 (both are required)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise StoreError(f"{p}: not a ledger entry ({err!r}); delete it to run that unit again") from None
            out.append(entry)
        return out

    def record(self, row: RunRow, files: dict[str, str] | None = None) -> None:
        """Write a finished run with its ``files`` ({path relative to the study folder: text}) atomically; an
        existing entry is replaced by the same run's."""
        if row.status != "done" or row.metrics is None:
            raise StoreError(f"ledger: run {row.key} is {row.status}, only finished runs are recorded")
        atomic_write_json(self.path(row.key), {"key": row.key, "factors": row.factors, "metrics": row.metrics,
                                               "seconds": row.seconds, "finished": row.finished,
                                               "config": row.config, "files": files or {}})

    def restore_files(self, entry: dict[str, Any], root: Path) -> int:
        """Write an entry's files under ``root`` where they are missing; returns how many were written."""
        written = 0
        for rel, text in (entry.get("files") or {}).items():
            pure = PurePosixPath(rel)
            if pure.is_absolute() or ".." in pure.parts or not isinstance(text, str):
                raise StoreError(f"{self.path(entry['key'])}: file {rel!r} is not a relative path to text inside "
                                 "the study folder")
            target = root / pure
            if not target.is_file():
                atomic_write_text(target, text)
                written += 1
        return written

    def sync(self, store: Store, root: Path | None = None,
             files_of: Callable[[RunRow], dict[str, str]] | None = None) -> tuple[int, int]:
        """Import the ledger's runs that the store has not finished (their files written under ``root``); record
        the store's finished runs that the ledger lacks (with ``files_of(row)``). Returns (imported, recorded)."""
        imported = 0
        for e in self.entries():
            if store.import_done(e["key"], e.get("config") or {}, e.get("factors") or {}, e["metrics"],
                                 e.get("seconds"), e.get("finished")):
                imported += 1
            if root is not None:
                self.restore_files(e, root)
        recorded = 0
        for row in store.rows("done", retired=True):
            if not self.path(row.key).is_file():
                self.record(row, files_of(row) if files_of else None)
                recorded += 1
        return imported, recorded
