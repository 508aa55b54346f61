"""The receiver against a hostile client: what each attack of issue 24 costs it, measured on its own process.

Usage: .venv/bin/python benchmarks/hostile_bench.py [--port 8697] [--source DIR] [--nofile 256]

Starts `leukofhir listen` as its own process with a descriptor limit of `--nofile` (soft and hard, as
`prlimit --nofile=256` sets it; no Airflow: accepted notifications wait in its queue), then, one after the other:
  idle 300     300 sockets that send nothing; seconds until a real notification is answered 2xx (20 s at most),
               and the receiver's open descriptors meanwhile
  idle 1       one socket that sends nothing: seconds until the receiver closes it (30 s at most)
  slowloris    a request head sent a byte a second: seconds until closed (30 s at most)
  slow body    a head, then its body a byte a second: seconds until closed (40 s at most)
  head flood   8 MiB of one header line: the answer, and how much the receiver's peak RSS (VmHWM) grew
  chunked      a 50 MB chunked body (with the secret): the answer, the bytes sent before it, RSS and peak growth
  deep JSON    100,000 nested arrays (with the secret): the answer, and whether a traceback reached the log
  log          10 requests with CR, LF, ANSI escapes, NUL, U+2028 or a 60,000-character path: control characters
               in the log, its longest line
  refusals     300 requests without the secret: lines of the log that mention them (after the summary interval)
`--source DIR` runs the receiver from the `leukofhir` package in DIR (e.g. `git archive main leukofhir | tar -x -C
DIR`: the code before a change). Prints one Markdown table row per case. Not a timed test."""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import requests  # noqa: E402

from support.hostile import (  # noqa: E402
    closed_within,
    connect,
    exchange,
    idle_sockets,
    memory_kib,
    open_descriptors,
    request_head,
    send_chunked,
)
from support.listen_process import listen_service  # noqa: E402

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028]")
# In a request's path: a carriage return starting a forged record, ANSI escapes (clear the screen, red) and a NUL,
# a line feed, a Unicode line separator.
FORGED = [
    "x%0D2030-01-01 00:00:00,000 ERROR forged",
    "x%1B[2J%1B[31mred%00nul",
    "x%0A2030-01-01 forged",
    "x%E2%80%A82030-01-01 forged",
]


def valid(target, timeout=3.0):
    method, path, body = target.valid()
    return requests.request(method, target.url + path, data=body, headers=target.auth(), timeout=timeout).status_code


def idle_300(target) -> str:
    with idle_sockets(target.port, 300):
        started = time.monotonic()
        while time.monotonic() - started < 20:
            try:
                if 200 <= valid(target) < 300:
                    return (
                        f"notification accepted after {time.monotonic() - started:.2f} s; "
                        f"{open_descriptors(target.pid)} descriptors open"
                    )
            except requests.RequestException:
                time.sleep(0.2)
        return f"no notification accepted in 20 s ({open_descriptors(target.pid)} descriptors open)"


def slow_clients(target) -> dict[str, str]:
    head = request_head("PUT", "/notify/Observation/slow", dict(target.auth(), **{"Content-Length": "1000"}))
    slowloris = b"PUT /notify/Observation/x HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 99
    cases = {"idle 1": (b"", 30), "slowloris": (slowloris, 30), "slow body": (b"{" * 1000, 40)}
    sockets = {name: connect(target.port) for name in cases}
    sockets["slow body"].sendall(head)
    with ThreadPoolExecutor(3) as pool:
        futures = {
            name: pool.submit(closed_within, sockets[name], limit, trickle, 1.0)
            for name, (trickle, limit) in cases.items()
        }
    for sock in sockets.values():
        sock.close()
    return {
        name: (f"closed after {f.result():.1f} s" if f.result() else f"open after {cases[name][1]} s")
        for name, f in futures.items()
    }


def head_flood(target) -> str:
    peak = memory_kib(target.pid)[1]
    status, _ = exchange(target.port, b"PUT /x HTTP/1.1\r\nHost: x\r\nX-Flood: " + b"a" * (8 << 20), timeout=10)
    return f"answer {status}; peak RSS +{(memory_kib(target.pid)[1] - peak) / 1024:.1f} MB"


def chunked(target) -> str:
    valid(target)
    rss, peak = memory_kib(target.pid)
    head = request_head("PUT", "/notify/Observation/big", dict(target.auth(), **{"Transfer-Encoding": "chunked"}))
    status, sent = send_chunked(target.port, head, 50_000_000)
    rss2, peak2 = memory_kib(target.pid)
    return (
        f"answer {status} after {sent / 1e6:.1f} MB sent; RSS {rss / 1024:.0f} → {rss2 / 1024:.0f} MB, "
        f"peak {peak / 1024:.0f} → {peak2 / 1024:.0f} MB"
    )


def deep_json(target) -> str:
    deep = b"[" * 100_000 + b"]" * 100_000
    headers = dict(target.auth(), **{"Content-Length": str(len(deep))})
    status, _ = exchange(target.port, request_head("PUT", "/notify/Observation/deep", headers) + deep)
    return f"answer {status}; traceback in the log: {'yes' if 'Traceback' in target.log_text() else 'no'}"


def log_forgery(target) -> str:
    for headers in ({}, target.auth()):
        for path in [f"/notify/{forged}" for forged in FORGED] + ["/notify/Observation/" + "a" * 60_000]:
            exchange(target.port, request_head("PUT", path, dict(headers, **{"Content-Length": "0"})), timeout=5)
    text = target.log_text()
    return (
        f"{len(CONTROL.findall(text))} control characters in the log; longest line "
        f"{max(len(line) for line in text.splitlines()):,} characters"
    )


def refusals(target) -> str:
    before = len(target.log_text().splitlines())
    with requests.Session() as session:
        for i in range(300):
            session.put(f"{target.url}/notify/Observation/r{i}", data=b"{}", timeout=10)
    time.sleep(11)  # past the summary interval
    lines = [
        line
        for line in target.log_text().splitlines()[before:]
        if "/notify/Observation/r" in line or "more in the last" in line
    ]
    return f"{len(lines)} log lines for 300 refused requests"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8697)
    parser.add_argument("--source", type=Path, help="run the receiver from the leukofhir package in this folder")
    parser.add_argument("--nofile", type=int, default=256)
    args = parser.parse_args()
    print("| case | result |\n|---|---|")
    with tempfile.TemporaryDirectory(prefix="hostile-bench-") as tmp:
        for name, case in (
            ("idle 300", idle_300),
            ("slow", slow_clients),
            ("head flood", head_flood),
            ("chunked 50 MB", chunked),
            ("deep JSON", deep_json),
            ("log", log_forgery),
            ("refusals", refusals),
        ):
            # A fresh receiver per case: one case's sockets or memory never weigh on the next.
            with listen_service(Path(tmp) / name, args.port, nofile=args.nofile, cwd=args.source) as target:
                result = case(target)
            for key, value in result.items() if isinstance(result, dict) else [(name, result)]:
                print(f"| {key} | {value} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
