"""`scripts/fhir-server`: status, a harmless second start, the failure paths that must leave nothing running, and
the H2 query plans the pipeline's searches rely on."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest
from conftest import LAUNCHER, ROOT

pytestmark = pytest.mark.fhir


def _run(env, *args, timeout=300):
    return subprocess.run([LAUNCHER, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def launcher_env(fhir_server_env, fhir_base_url):
    if fhir_server_env is None:
        pytest.skip("FHIR_BASE_URL names an outside server: the launcher is not in charge of it")
    return fhir_server_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_and_a_second_start_are_harmless(launcher_env, fhir_base_url):
    status = _run(launcher_env, "status")
    assert status.returncode == 0 and status.stdout.startswith(f"running {fhir_base_url}")
    again = _run(launcher_env, "start")
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == fhir_base_url
    assert "already running" in again.stderr


def test_status_of_a_port_with_no_server_exits_3(launcher_env):
    env = dict(launcher_env, FHIR_PORT=str(_free_port()))
    status = _run(env, "status")
    assert status.returncode == 3 and status.stdout.startswith("stopped")
    assert _run(env, "stop").returncode == 0  # stopping nothing is harmless


def test_port_taken_by_another_process_is_refused_clearly(launcher_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = dict(launcher_env, FHIR_PORT=str(busy.getsockname()[1]))
        started = _run(env, "start")
    assert started.returncode == 1 and "already in use" in started.stderr


def test_start_that_is_not_healthy_in_time_fails_with_the_log_tail_and_leaves_nothing(launcher_env, tmp_path):
    env = dict(launcher_env, FHIR_PORT=str(_free_port()), FHIR_DATA_DIR=str(tmp_path), FHIR_START_TIMEOUT="2")
    before = _servers()
    started = _run(env, "start")
    assert started.returncode == 1
    assert "not healthy after 2s" in started.stderr and "Last 40 lines" in started.stderr
    assert _run(env, "status").returncode == 3
    assert _servers() == before  # the JVM it started was stopped again


def _servers() -> set[str]:
    # Only this checkout's servers: other checkouts on a shared machine start and stop theirs meanwhile.
    found = subprocess.run(
        ["pgrep", "-f", f"{ROOT}/fhir-server/target/fhir-server.jar.*org.leukofhir.fhirserver"],
        capture_output=True,
        text=True,
    )
    return set(found.stdout.split())


def test_h2_plans_of_the_pipelines_searches_seek_instead_of_reading_whole_tables(launcher_env):
    # At start-up the launcher asks H2 for its plan of each statement shape behind the pipeline's searches, through
    # the settings and the statement inspector it really runs with (fhir-server H2QueryPlans): a token OR-list and a
    # reference OR-list read by the join key, `_revinclude` seeking on its IN list, the id lookup using an index.
    # Without them, `code=<32 codes>` beside a date took 40 s on 20,000 Observations (docs/local-fhir-server.md).
    log = ROOT / "fhir-server" / "target" / f"fhir-server-{launcher_env['FHIR_PORT']}.log"
    text = log.read_text(encoding="utf-8", errors="replace")
    problems = re.findall(r"H2 query plan(?:s could not be checked| for .*)", text)
    assert problems == []
    assert "H2 query plans: joined token OR-list, joined reference OR-list, _revinclude, id lookup ok" in text
