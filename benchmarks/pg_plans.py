"""PostgreSQL's plans of the SQL HAPI runs for the pipeline's searches, on a loaded server of scripts/fhir-server
(FHIR_DB=postgres): the evidence for the indexes and settings the launcher gives PostgreSQL.

Usage: .venv/bin/python benchmarks/pg_plans.py --port 8510 [--patients 100] [--out DIR]

Turns on PostgreSQL's statement log for a moment (ALTER SYSTEM, as the cluster's own user through its socket), runs
the pipeline's searches once (the first page of each: `Observation?code=<codes>&date=...` over 2015-2020 and over one
day, by `_lastUpdated` over the last hour and the last year, one batch of --patients patients' whole-history searches
with `_revinclude`/`_include`, the project's Flags by `_tag` + subjects; the first page of each), turns the log off,
and runs EXPLAIN (ANALYZE, BUFFERS) of every SELECT HAPI sent for them with its logged parameters. Prints each
statement's time and plan (also to --out). Not a timed test.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from leukofhir.config import load_config  # noqa: E402
from leukofhir.extract.search import PAGE_SIZE, Window, history_searches, window_searches  # noqa: E402


def instance(port: int) -> tuple[Path, int]:
    db, home, pg_port = (ROOT / "fhir-server" / "target" / f"fhir-server-{port}.db").read_text().split()
    if db != "postgres":
        sys.exit(f"the server on port {port} does not run on PostgreSQL")
    return Path(home), int(pg_port)


def psql(home: Path, pg_port: int, sql: str, database: str = "hapi") -> str:
    """psql as the cluster's own user (`postgres` when root) through its socket; sql on stdin."""
    owner = (home / "data").stat().st_uid
    import pwd

    user = pwd.getpwuid(owner).pw_name
    prefix = (
        ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwuid(owner).pw_gid}", "--init-groups", "--"]
        if owner != 0 and subprocess.os.getuid() == 0
        else []
    )
    done = subprocess.run(
        [
            *prefix,
            "psql",
            "-X",
            "-q",
            "-h",
            str(home / "run"),
            "-p",
            str(pg_port),
            "-U",
            user,
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
        ],
        input=sql,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout


def searches(patients: list[str]) -> list[tuple[str, dict]]:
    """The backfill's window (every result) and a day of it, the surveillance's last hour (`_lastUpdated`) and a
    year of it, and one batch's histories."""
    rules = load_config()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    out = window_searches(Window.parse("2015-01-01", "2020-01-01", "effective"), rules)
    out += window_searches(Window.parse("2017-03-01", "2017-03-02", "effective"), rules)[:1]
    out += window_searches(Window.parse(now - timedelta(hours=1), now, "lastUpdated"), rules)[:1]
    out += window_searches(Window.parse(now - timedelta(days=365), now, "lastUpdated"), rules)[:1]
    out += list(history_searches(rules, patients))
    return out


EXECUTED = re.compile(r"LOG:  duration: [\d.]+ ms  execute [^:]*: (.*)$")


def captured(log_text: str) -> list[tuple[str, str]]:
    """(statement, parameters) of each statement executed, in order (its parameters on the DETAIL line after it)."""
    lines = log_text.splitlines()
    out = []
    for number, line in enumerate(lines):
        found = EXECUTED.search(line)
        if found:
            after = lines[number + 1] if number + 1 < len(lines) else ""
            parameters = after.split("DETAIL:  parameters: ", 1)[1] if "DETAIL:  parameters: " in after else ""
            out.append((found.group(1).strip(), parameters.strip()))
    return out


def with_parameters(sql: str, parameters: str) -> str:
    """The statement with its logged parameters ($1 = '...', ...) in place, highest number first."""
    values = dict(re.findall(r"\$(\d+) = ('(?:[^']|'')*'|NULL)", parameters))
    for number in sorted(values, key=int, reverse=True):
        sql = re.sub(rf"\${number}(?!\d)", values[number], sql)
    return sql


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8510)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--out", help="folder for the plans (plans.txt)")
    args = parser.parse_args()
    home, pg_port = instance(args.port)
    base = f"http://127.0.0.1:{args.port}/fhir"
    session = requests.Session()
    session.headers.update({"Accept": "application/fhir+json", "Cache-Control": "no-cache"})
    ids = [
        e["resource"]["id"]
        for e in session.get(f"{base}/Patient", params={"_count": args.patients, "_elements": "id"}).json()["entry"]
    ]
    log_file = home / "postgres.log"
    offset = log_file.stat().st_size
    psql(home, pg_port, "ALTER SYSTEM SET log_min_duration_statement = 0; SELECT pg_reload_conf();", "postgres")
    time.sleep(1)
    try:
        shown = []
        for resource_type, params in searches(ids):
            params = {**params, "_count": PAGE_SIZE}
            begin = time.perf_counter()
            answer = session.post(f"{base}/{resource_type}/_search", data=params, timeout=600)
            shown.append(
                f"{resource_type} {sorted(params)}: HTTP {answer.status_code}, "
                f"{len(answer.json().get('entry') or [])} entries, {time.perf_counter() - begin:.2f} s"
            )
    finally:
        psql(home, pg_port, "ALTER SYSTEM RESET log_min_duration_statement; SELECT pg_reload_conf();", "postgres")
    with open(log_file, encoding="utf-8", errors="replace") as fh:
        fh.seek(offset)
        text = fh.read()
    report = ["searches (first page each):", *shown, ""]
    seen = set()
    for sql, parameters in captured(text):
        if not sql.startswith(("SELECT t", "SELECT r.")):
            continue  # HAPI's search SQL (SearchQueryBuilder, includes); not the loads by primary key or the writes
        key = (sql, parameters)
        if key in seen:
            continue
        seen.add(key)
        plan = psql(home, pg_port, f"EXPLAIN (ANALYZE, BUFFERS) {with_parameters(sql, parameters)};")
        report += ["-" * 100, sql, parameters, plan]
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "plans.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
