"""The receiver's durable queue (SQLite): touched patients waiting for a batch, and batches waiting for Airflow.

A patient is acknowledged to the FHIR server only once it is committed here, and leaves only when a run that
holds it was accepted: a crash, a restart or an Airflow outage loses nothing. Notifications that name no resource
(an empty POST) are kept the same way, as one pending window request that becomes a window batch."""

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
-- Notifications without payload since the last window batch: they say only that something changed (one row at most).
CREATE TABLE IF NOT EXISTS window_pending (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
-- Where the last window batch ended: the next one starts there, so a stream of them reads no change twice.
CREATE TABLE IF NOT EXISTS window_end (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Batch:
    """Patients for one run, or (`window`, with no patients) a `_lastUpdated` window [start, end) in ISO 8601."""

    seq: int
    run_id: str
    patients: list[str]
    attempts: int
    window: tuple[str, str] | None = None


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
        if "window" not in {row[1] for row in self._db.execute("PRAGMA table_info(batch)")}:
            self._db.execute("ALTER TABLE batch ADD COLUMN window TEXT")  # a queue file of the first version

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
        self._tx(
            lambda db: db.executemany(
                "INSERT INTO pending (patient, first_seen, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT(patient) DO UPDATE SET last_seen = excluded.last_seen",
                [(p, now, now) for p in patients],
            )
        )

    def pending_state(self) -> PendingState:
        with self._lock:
            count, first, last = self._db.execute(
                "SELECT COUNT(*), MIN(first_seen), MAX(last_seen) FROM pending"
            ).fetchone()
        return PendingState(count, first, last)

    def add_window_request(self) -> None:
        """Record a notification that names nothing: it asks for a window batch."""
        now = self._clock()
        self._tx(
            lambda db: db.execute(
                "INSERT INTO window_pending (one, first_seen, last_seen) VALUES (1, ?, ?) "
                "ON CONFLICT(one) DO UPDATE SET last_seen = excluded.last_seen",
                (now, now),
            )
        )

    def window_state(self) -> PendingState:
        with self._lock:
            row = self._db.execute("SELECT first_seen, last_seen FROM window_pending").fetchone()
        return PendingState(1, *row) if row else PendingState(0, None, None)

    def form_window_batch(self, lookback: float, run_id_prefix: str) -> Batch | None:
        """The pending window request as a batch: from where the last window ended, but at most `lookback` seconds
        before the first notification, to now."""

        def move(db):
            row = db.execute("SELECT first_seen FROM window_pending").fetchone()
            if row is None:
                return None
            now = self._clock()
            start = row[0] - lookback
            last = db.execute("SELECT at FROM window_end").fetchone()
            if last is not None and start < last[0] < now:
                start = last[0]
            window = (_iso(start), _iso(now))
            batch = self._insert_batch(db, run_id_prefix, now, [], window)
            db.execute(
                "INSERT INTO window_end (one, at) VALUES (1, ?) ON CONFLICT(one) DO UPDATE SET at = excluded.at", (now,)
            )
            db.execute("DELETE FROM window_pending")
            return batch

        return self._tx(move)

    def _insert_batch(
        self, db, run_id_prefix: str, now: float, patients: list[str], window: tuple[str, str] | None = None
    ) -> Batch:
        cur = db.execute(
            "INSERT INTO batch (run_id, created, patients, next_attempt, window) VALUES ('', ?, ?, ?, ?)",
            (now, json.dumps(patients), now, json.dumps(window) if window else None),
        )
        seq = cur.lastrowid
        # Unique across restarts and across a recreated queue file: creation time and sequence number.
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        run_id = f"{run_id_prefix}__{stamp}_{seq}"
        db.execute("UPDATE batch SET run_id = ? WHERE seq = ?", (run_id, seq))
        return Batch(seq, run_id, patients, 0, window)

    def form_batch(self, max_patients: int, run_id_prefix: str) -> Batch | None:
        """Move up to `max_patients` waiting patients (longest waiting first) into a new batch with its run id."""

        def move(db):
            rows = db.execute(
                "SELECT patient FROM pending ORDER BY first_seen, patient LIMIT ?", (max_patients,)
            ).fetchall()
            if not rows:
                return None
            batch = self._insert_batch(db, run_id_prefix, self._clock(), sorted(r[0] for r in rows))
            db.executemany("DELETE FROM pending WHERE patient = ?", rows)
            return batch

        return self._tx(move)

    def due_batches(self) -> list[Batch]:
        now = self._clock()
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, run_id, patients, attempts, window FROM batch WHERE next_attempt <= ? ORDER BY seq", (now,)
            ).fetchall()
        return [
            Batch(seq, run_id, json.loads(p), attempts, tuple(json.loads(w)) if w else None)
            for seq, run_id, p, attempts, w in rows
        ]

    def accepted(self, batch: Batch) -> None:
        """The run holding this batch exists in Airflow: its patients leave the queue."""
        self._tx(lambda db: db.execute("DELETE FROM batch WHERE seq = ?", (batch.seq,)))

    def retry_later(self, batch: Batch, delay: float) -> None:
        now = self._clock()
        self._tx(
            lambda db: db.execute(
                "UPDATE batch SET attempts = attempts + 1, next_attempt = ? WHERE seq = ?", (now + delay, batch.seq)
            )
        )

    def counts(self) -> dict[str, int]:
        with self._lock:
            pending = self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
            batches, waiting = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(json_array_length(patients)), 0) FROM batch"
            ).fetchone()
            windows = self._db.execute("SELECT COUNT(*) FROM window_pending").fetchone()[0]
        return {
            "pending_patients": pending,
            "unaccepted_batches": batches,
            "patients_in_unaccepted_batches": waiting,
            "pending_window_requests": windows,
        }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")
