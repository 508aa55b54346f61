"""The DAGs' own failures told to the site through Airflow's notifier interface: a task that fails for good calls the
configured notifier (SmtpNotifier, the SMTP provider being installed), which mails a real SMTP server on loopback; the
message names ids only."""

from __future__ import annotations

import email
import json
import os
import socketserver
import subprocess
import sys
import threading

import pytest
from conftest import ROOT

RECEIVED: list[str] = []


class _Smtp(socketserver.StreamRequestHandler):
    """Just enough SMTP (RFC 5321) to accept one message: EHLO, MAIL, RCPT, DATA, QUIT."""

    def handle(self) -> None:
        self.wfile.write(b"220 test ESMTP\r\n")
        while line := self.rfile.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                self.wfile.write(b"354 go on\r\n")
                body = []
                while (data := self.rfile.readline()) not in (b".\r\n", b""):
                    body.append(data.decode("utf-8", "replace"))
                RECEIVED.append("".join(body))
                self.wfile.write(b"250 queued\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            elif verb == b"EHLO":
                self.wfile.write(b"250 test\r\n")
            else:
                self.wfile.write(b"250 ok\r\n")


@pytest.fixture
def smtp_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Smtp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    RECEIVED.clear()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


# dag.test() of the near-real-time DAG in a process of its own (a fresh Airflow home, the notifier configured in its
# environment, as a site configures it), its tasks without retries: the failure itself, not retries minutes apart.
DAG_TEST = """
import json, os, subprocess, sys
from pathlib import Path
migrated = subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], capture_output=True,
                          text=True)
assert migrated.returncode == 0, migrated.stderr[-2000:]
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).dags["leukopenia_patients"]
for task in dag.tasks:
    task.retries = 0
run = dag.test(run_conf={"patients": ["p-notify"]})
print(json.dumps({"state": str(run.state), "run_id": run.run_id}))
"""


def test_a_failed_dag_run_mails_the_site_with_ids_only(airflow_db, smtp_server, tmp_path):
    """The FHIR server is gone: the run fails, and the site's address gets a message naming the DAG, the run and the
    task, never the error's text (it may quote a server's answer)."""
    home = tmp_path / "airflow"
    home.mkdir()
    env = dict(
        os.environ,
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW_CONN_FHIR_DEFAULT=json.dumps({"conn_type": "fhir", "host": "http://127.0.0.1:9/fhir"}),
        AIRFLOW_CONN_SMTP_NOTIFY=json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": smtp_server,
                "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "leukofhir@hospital.example"},
            }
        ),
        LEUKOFHIR_NOTIFY_EMAIL="oncall@hospital.example, lab-it@hospital.example",
        LEUKOFHIR_NOTIFY_SMTP_CONN="smtp_notify",
    )
    done = subprocess.run([sys.executable, "-c", DAG_TEST], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["state"] == "failed"
    assert RECEIVED, "no message reached the SMTP server"
    for raw in RECEIVED:
        message = email.message_from_string(raw)
        body = "".join(part.get_payload(decode=True).decode() for part in message.walk() if not part.is_multipart())
        assert message["Subject"] == f"leukofhir: leukopenia_patients failed (run {outcome['run_id']})"
        assert "oncall@hospital.example" in message["To"] and "lab-it@hospital.example" in message["To"]
        assert "of leukopenia_patients failed, run " + outcome["run_id"] in body
        assert "p-notify" not in raw + body and "127.0.0.1" not in body  # the task log says why, not the mail


def test_without_a_notifier_configured_the_dags_have_no_callback():
    probe = (
        "import json, sys; from leukofhir.airflow.tasks import DEFAULT_ARGS; "
        "print(json.dumps([type(n).__name__ for n in DEFAULT_ARGS.get('on_failure_callback', [])]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEUKOFHIR_NOTIFY_")}
    names = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", probe], env=e, capture_output=True, text=True, cwd=ROOT, check=True
            ).stdout
        )
        for e in (env, dict(env, LEUKOFHIR_NOTIFY_EMAIL="oncall@hospital.example"))
    ]
    assert names == [[], ["SmtpNotifier"]]
