"""The receiver's durable queue (SQLite): touched patients waiting for a batch, and batches waiting for Airflow.

A patient is acknowledged to the FHIR server only once it is committed here, and leaves only when a run that
holds it was accepted: a crash, a restart or an Airflow outage loses nothing."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    patient TEXT PRIMARY KEY,   -- 'Patient/<id>': a reference, never resource content
    first_seen REAL NOT NULL,   -- when it was first touched since its last batch (max-wait bound)
    last_seen REAL NOT NULL     -- when it was last touched (quiet-period debounce)
);
CREATE TABLE IF NOT EXISTS batch (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,  -- fixed when the batch is formed: a retry re-sends the same run id
    created REAL NOT NULL,
    patients TEXT NOT NULL,       -- JSON list of references
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Batch:
    seq: int
    run_id: str
    patients: list[str]
    attempts: int


@dataclass(frozen=True)
class PendingState:
    count: int
    first_seen: float | None
    last_seen: float | None


class PatientQueue:
    """Thread-safe; one process at a time owns the file. Every change is one committed transaction, and
    `synchronous=FULL` makes each commit durable before the caller acknowledges anything."""

    def __init__(self, path: str | Path, *, clock=time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def add(self, patients: list[str]) -> None:
        """Record touched patients; a patient already waiting stays once (its last_seen moves on)."""
        now = self._clock()
        self._tx(lambda db: db.executemany(
            "INSERT INTO pending (patient, first_seen, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(patient) DO UPDATE SET last_seen = excluded.last_seen",
            [(p, now, now) for p in patients]))

    def pending_state(self) -> PendingState:
        with self._lock:
            count, first, last = self._db.execute(
                "SELECT COUNT(*), MIN(first_seen), MAX(last_seen) FROM pending").fetchone()
        return PendingState(count, first, last)

    def form_batch(self, max_patients: int, run_id_prefix: str) -> Batch | None:
        """Move up to `max_patients` waiting patients (longest waiting first) into a new batch with its run id."""
        def move(db):
            rows = db.execute("SELECT patient FROM pending ORDER BY first_seen, patient LIMIT ?",
                              (max_patients,)).fetchall()
            if not rows:
                return None
            patients = sorted(r[0] for r in rows)
            now = self._clock()
            cur = db.execute("INSERT INTO batch (run_id, created, patients, next_attempt) VALUES ('', ?, ?, ?)",
                             (now, json.dumps(patients), now))
            seq = cur.lastrowid
            # Unique across restarts and across a recreated queue file: creation time and sequence number.
            stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            run_id = f"{run_id_prefix}__{stamp}_{seq}"
            db.execute("UPDATE batch SET run_id = ? WHERE seq = ?", (run_id, seq))
            db.executemany("DELETE FROM pending WHERE patient = ?", rows)
            return Batch(seq, run_id, patients, 0)
        return self._tx(move)

    def due_batches(self) -> list[Batch]:
        now = self._clock()
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, run_id, patients, attempts FROM batch WHERE next_attempt <= ? ORDER BY seq", (now,)
            ).fetchall()
        return [Batch(seq, run_id, json.loads(p), attempts) for seq, run_id, p, attempts in rows]

    def accepted(self, batch: Batch) -> None:
        """The run holding this batch exists in Airflow: its patients leave the queue."""
        self._tx(lambda db: db.execute("DELETE FROM batch WHERE seq = ?", (batch.seq,)))

    def retry_later(self, batch: Batch, delay: float) -> None:
        now = self._clock()
        self._tx(lambda db: db.execute(
            "UPDATE batch SET attempts = attempts + 1, next_attempt = ? WHERE seq = ?", (now + delay, batch.seq)))

    def counts(self) -> dict[str, int]:
        with self._lock:
            pending = self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
            batches, waiting = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(json_array_length(patients)), 0) FROM batch").fetchone()
        return {"pending_patients": pending, "unaccepted_batches": batches, "patients_in_unaccepted_batches": waiting}
