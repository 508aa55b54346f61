"""The task-instance host name callable that tells apart workers sharing one machine."""

from __future__ import annotations

import socket

from leukofhir.airflow.hostname import HOSTNAME_ENV, hostname


def test_the_worker_s_own_name_when_set(monkeypatch):
    monkeypatch.setenv(HOSTNAME_ENV, "vm-worker2")
    assert hostname() == "vm-worker2"


def test_the_fqdn_otherwise(monkeypatch):
    monkeypatch.delenv(HOSTNAME_ENV, raising=False)
    assert hostname() == socket.getfqdn()
