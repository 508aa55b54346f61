"""CPU seconds of each phase of an evaluate run (read + normalise, finish, validate, evaluate, build Flags).

Usage: .venv/bin/python benchmarks/phases_bench.py --dir DIR   (DIR: the input evaluate_bench.py generated with --dir)
CPU time of this one process, so a shared machine's load disturbs it less than wall time; GX's context is built first,
outside the timings. Works on older code too (it uses only Normaliser, validate_batch, evaluate and build_flag), so
put another checkout first on PYTHONPATH to compare. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="folder of NDJSON input (evaluate_bench.py --dir)")
    args = parser.parse_args()
    import leukofhir.evaluate.validate as validate
    from leukofhir.config import load_config
    from leukofhir.evaluate.flag_resource import build_flag
    from leukofhir.evaluate.rules import evaluate
    from leukofhir.extract.reader import iter_located
    from leukofhir.normalise import Normaliser

    validate._context()  # GX's import and context: a fixed cost, not a phase
    rules = load_config()
    spent: dict[str, float] = {}
    clock = time.process_time()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.process_time()
        spent[name] = round(now - clock, 2)
        clock = now

    normaliser = Normaliser(rules)
    add = normaliser.add
    for index, (resource, *_) in enumerate(iter_located([args.dir], lambda error: None)):
        add(resource, index)
    phase("read+normalise")
    done = normaliser.finish()
    phase("finish")
    parameters = validate.suite_parameters(rules)
    observations = validate.validate_batch("observations", done.observations, parameters).valid
    exposures = validate.validate_batch("exposures", done.exposures, parameters).valid
    phase("validate")
    specs = evaluate(observations, done.patients, exposures, rules)
    phase("evaluate")
    shapes: set = set()
    flags = [build_flag(spec, rules, shapes) for spec in specs]
    phase("flags")
    print(json.dumps({**spent, "flags_built": len(flags)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
