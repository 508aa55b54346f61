"""The host name Airflow records on a task instance: each worker's own name when several share one machine."""

from __future__ import annotations

import os
import socket

#: Set per worker by scripts/airflow-stack, whose two Celery workers run on one machine.
HOSTNAME_ENV = "LEUKOFHIR_WORKER_HOSTNAME"


def hostname() -> str:
    """Airflow's `[core] hostname_callable`: $LEUKOFHIR_WORKER_HOSTNAME when set, else the FQDN (Airflow's default).

    Airflow's default gives every worker on one machine the same name, so a task instance would not tell
    which worker ran it."""
    return os.environ.get(HOSTNAME_ENV) or socket.getfqdn()
