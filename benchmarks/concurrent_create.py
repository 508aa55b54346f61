"""Eight writers create the same new Flag at once: which precondition makes the server apply exactly one of them?

Usage: .venv/bin/python benchmarks/concurrent_create.py --fhir-url URL [--rounds 20] [--writers 8]
                                                         [--ways plain,if-none-match,if-match-0]

For each round and each way, `--writers` threads (one HTTP session each, released together by a barrier) send a
transaction Bundle with one entry, `PUT Flag/<new id>` (the id the Flag's identifier derives, as write/flags.py writes a
new Flag), each with its own content, and the precondition of the way:
  plain          no precondition (what main did before issue 17);
  if-none-match  `request.ifNoneMatch: *` ("only if there is none": FHIR defines it for reads in a batch, not writes);
  if-match-0     `request.ifMatch: W/"0"` (version 0: no version the server ever gave; what write/flags.py sends).
Each answer is counted by status and, for a 409, by HAPI's message code (HAPI-0989: "not the current version";
HAPI-0825 and others: simultaneous writers). Then the Flag's history says how many writes were applied: a create
that must not overwrite a Flag that appeared meanwhile applies exactly one per round. A writer whose answer was a
409 other than HAPI-0989 sends its transaction once more (the client's retry of a simultaneous-writer 409), so the
figures also say what the retry meets. Not a timed test: a correctness measurement, printed as a table."""

from __future__ import annotations

import argparse
import re
import sys
import threading
import uuid
from collections import Counter

import requests

WAYS = {
    "plain": {},
    "if-none-match": {"ifNoneMatch": "*"},
    "if-match-0": {"ifMatch": 'W/"0"'},
}
FHIR_JSON = "application/fhir+json"


def answer_kind(response: requests.Response) -> str:
    if response.status_code < 300:
        return str(response.status_code)
    codes = re.findall(r"HAPI-(\d{4})", response.text)
    # HAPI prefixes the message of the code that matters with HAPI-0550 (its transaction wrapper): the last one.
    inner = [c for c in codes if c != "0550"]
    return f"{response.status_code} HAPI-{inner[-1]}" if inner else str(response.status_code)


def one_round(base: str, patient: str, way: str, writers: int) -> tuple[Counter, int]:
    flag_id = f"leukofhir-bench-{uuid.uuid4().hex}"
    barrier = threading.Barrier(writers)
    answers: Counter = Counter()
    lock = threading.Lock()

    def write(n: int) -> None:
        flag = {
            "resourceType": "Flag",
            "id": flag_id,
            "status": "active",
            "code": {"text": f"writer {n}"},
            "subject": {"reference": f"Patient/{patient}"},
        }
        entry = {"resource": flag, "request": {"method": "PUT", "url": f"Flag/{flag_id}", **WAYS[way]}}
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
        with requests.Session() as session:
            barrier.wait()
            kinds = []
            for _ in range(2):  # the first answer, and the retry of a simultaneous-writer 409
                response = session.post(base, json=bundle, headers={"Content-Type": FHIR_JSON}, timeout=120)
                kinds.append(answer_kind(response))
                if response.status_code != 409 or "HAPI-0989" in response.text:
                    break
        with lock:
            answers[" → ".join(kinds)] += 1

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = requests.get(
        f"{base}/Flag/{flag_id}/_history", headers={"Accept": FHIR_JSON, "Cache-Control": "no-cache"}, timeout=60
    ).json()
    return answers, len(history.get("entry") or [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fhir-url", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--ways", default=",".join(WAYS))
    args = parser.parse_args(argv)
    base = args.fhir_url.rstrip("/")
    patient = f"bench-{uuid.uuid4().hex[:12]}"
    requests.put(
        f"{base}/Patient/{patient}",
        json={"resourceType": "Patient", "id": patient},
        headers={"Content-Type": FHIR_JSON},
        timeout=60,
    ).raise_for_status()
    for way in args.ways.split(","):
        applied: Counter = Counter()
        answers: Counter = Counter()
        for _ in range(args.rounds):
            round_answers, versions = one_round(base, patient, way, args.writers)
            answers.update(round_answers)
            applied[versions] += 1
        print(f"{way}: {args.rounds} rounds of {args.writers} writers")
        print("  writes applied per round: " + ", ".join(f"{n}: {c} rounds" for n, c in sorted(applied.items())))
        print("  answers (→ the retry's): " + ", ".join(f"{k}: {v}" for k, v in answers.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
