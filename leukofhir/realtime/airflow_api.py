"""Airflow 3 REST API, the little the receiver needs: a JWT from /auth/token, and triggering a DAG run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter

from leukofhir.errors import LeukofhirError, UsageError
from leukofhir.fhir.secrets import secret

log = logging.getLogger(__name__)

URL_ENV = "LEUKOFHIR_AIRFLOW_URL"
USER_ENV = "LEUKOFHIR_AIRFLOW_USER"
PASSWORD_ENV = "LEUKOFHIR_AIRFLOW_PASSWORD"


class AirflowError(LeukofhirError):
    """Airflow did not accept a request; `status` is None when it did not answer at all."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class AirflowSettings:
    url: str
    user: str
    password: str

    @classmethod
    def from_environment(cls, url: str | None = None, environ=os.environ) -> AirflowSettings:
        """URL from the argument or LEUKOFHIR_AIRFLOW_URL; user and password from LEUKOFHIR_AIRFLOW_USER and
        LEUKOFHIR_AIRFLOW_PASSWORD, or the files their *_FILE twins name (never from the command line)."""
        url = url or secret(URL_ENV, environ)
        user, password = secret(USER_ENV, environ), secret(PASSWORD_ENV, environ)
        if not url:
            raise UsageError(f"the Airflow URL is missing: --airflow-url or {URL_ENV}")
        if not user or password is None:
            raise UsageError(f"Airflow credentials are missing: {USER_ENV} and {PASSWORD_ENV} (or *_FILE)")
        return cls(url.rstrip("/"), user, password)


class AirflowClient:
    """Airflow's public API (`/api/v2`) with a JWT from `/auth/token`, fetched lazily and fetched again once
    when Airflow refuses it. Airflow 3.3 answers 401 for an expired token but 403 "Invalid JWT token" for one
    it cannot verify (an api-server restarted with another signing key): both get one new token, and a second
    refusal is an error (a 403 for want of permission stays a 403). TLS is verified (a private CA goes in
    REQUESTS_CA_BUNDLE); every request has a timeout."""

    def __init__(self, settings: AirflowSettings, *, timeout: float = 10.0):
        self.settings = settings
        self.timeout = timeout
        self._token: str | None = None
        self.session = requests.Session()
        # Retries are the caller's (it keeps the batch on disk and tries again later).
        adapter = HTTPAdapter(max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def _login(self) -> str:
        url = f"{self.settings.url}/auth/token"
        try:
            response = self.session.post(
                url, json={"username": self.settings.user, "password": self.settings.password}, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise AirflowError(f"POST {url}: no answer ({type(exc).__name__})") from exc
        if response.status_code not in (200, 201):
            raise AirflowError(f"POST {url}: HTTP {response.status_code}: {_detail(response)}", response.status_code)
        token = (response.json() or {}).get("access_token")
        if not token:
            raise AirflowError(f"POST {url}: the answer has no access_token", response.status_code)
        return token

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """`method` on `path` (e.g. `/api/v2/dags`) with the token; the response as it came (any status)."""
        url = f"{self.settings.url}{path}"
        for attempt in (1, 2):
            if self._token is None:
                self._token = self._login()
            try:
                response = self.session.request(
                    method, url, headers={"Authorization": f"Bearer {self._token}"}, timeout=self.timeout, **kwargs
                )
            except requests.RequestException as exc:
                raise AirflowError(f"{method} {url}: no answer ({type(exc).__name__})") from exc
            if response.status_code in (401, 403) and attempt == 1:
                log.info(
                    "Airflow refused the token (HTTP %d: %s): logging in again", response.status_code, _detail(response)
                )
                self._token = None  # refreshed once; a second refusal is an error
                continue
            return response
        return response

    def trigger_dag_run(self, dag_id: str, run_id: str, conf: dict, note: str | None = None) -> str:
        """Create a manual run with `run_id` and `conf`: "created", or "exists" when Airflow already has a run
        with that id (409: an earlier try went through and its answer was lost). Raises AirflowError."""
        body = {"logical_date": None, "dag_run_id": run_id, "conf": conf}
        if note:
            body["note"] = note
        path = f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns"
        response = self.request("POST", path, json=body)
        if response.status_code in (200, 201):
            return "created"
        if response.status_code == 409:
            return "exists"
        raise AirflowError(f"POST {path}: HTTP {response.status_code}: {_detail(response)}", response.status_code)

    def dag_runs(self, dag_id: str) -> list[dict]:
        """Every run of `dag_id` (paged by 100), oldest first."""
        runs, offset = [], 0
        while True:
            response = self.request(
                "GET",
                f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns",
                params={"limit": 100, "offset": offset, "order_by": "id"},
            )
            if response.status_code != 200:
                raise AirflowError(
                    f"GET dagRuns of {dag_id}: HTTP {response.status_code}: {_detail(response)}", response.status_code
                )
            page = response.json().get("dag_runs") or []
            runs.extend(page)
            offset += len(page)
            if len(page) < 100:
                return runs


def _detail(response: requests.Response) -> str:
    """Airflow's error text (`detail`), short; never a request body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail if detail is not None else response.text)[:300].strip()
