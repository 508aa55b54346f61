"""`leukofhir listen`: receive the FHIR server's rest-hook notifications and start one Airflow run per batch.

FHIR server ──PUT/DELETE {endpoint}/Type/id──▶ secret checked ──▶ patient reference ──▶ durable queue (SQLite)
   ──debounce──▶ batch with a fixed run id ──POST /api/v2/dags/leukopenia_patients/dagRuns──▶ Airflow
FHIR server ──empty POST {endpoint}──▶ secret checked ──▶ window request ──▶ durable queue
   ──debounce──▶ window batch ──POST /api/v2/dags/leukopenia_surveillance/dagRuns (Params start, end)──▶ Airflow

Only references travel: the run's conf is `{"patients": ["Patient/<id>", ...]}` (or a window's two instants);
resource content is read from the request and dropped, and never logged."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from leukofhir.extract.search import local_patient_id, subject_of
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FatalFhirError, FhirError
from leukofhir.fhir.ids import InvalidIdError, is_valid_id, resource_path, shown
from leukofhir.fhir.references import reference_target
from leukofhir.realtime.airflow_api import AirflowClient, AirflowError
from leukofhir.realtime.queue import Batch, PatientQueue
from leukofhir.realtime.secret import is_authorized
from leukofhir.service.bodies import BadBody, parse_json
from leukofhir.service.limits import Limits

log = logging.getLogger(__name__)

DAG_ID = "leukopenia_patients"
RUN_ID_PREFIX = "leukofhir_realtime"
WINDOW_DAG_ID = "leukopenia_surveillance"
WINDOW_RUN_ID_PREFIX = "leukofhir_realtime_window"
# The resources whose Subscriptions `leukofhir subscribe` creates; each names its patient in `subject`.
WATCHED_TYPES = frozenset({"Observation", "MedicationStatement", "MedicationRequest", "MedicationAdministration"})
MAX_BODY_BYTES = 5 * 1024 * 1024  # a notification's body: one resource
LIMITS = Limits(max_body_bytes=MAX_BODY_BYTES)  # the connection defaults of every service (leukofhir/service)


@dataclass(frozen=True)
class BatchPolicy:
    """When touched patients become a run.

    A batch forms when no new patient has been touched for `debounce` seconds (a CBC panel arrives as five or
    more Observations: written in one transaction, HAPI delivered them within 0.1 s here; written one by one,
    within its 1 s submission interval; a panel split in two costs one more run, never a Flag), or when the
    oldest waiting patient has waited `max_wait` seconds (a steady stream still gets runs; at most one run per
    `max_wait` while notifications keep coming), or when `max_patients` are waiting. The defaults are what
    benchmarks/realtime_bench.py measured best (docs/near-real-time.md). A failed trigger is tried
    again after 1, 2, 4 ... seconds, at most `retry_max` apart, as long as it takes.

    Notifications that name nothing (empty POSTs) are debounced the same way into one surveillance run over a
    `_lastUpdated` window: from where the last such window ended, and at most `window_lookback` seconds before
    the first of them (HAPI retries a delivery for about 60 s; the rest is room for clocks), to when the batch
    forms."""

    debounce: float = 1.0
    max_wait: float = 5.0
    max_patients: int = 500
    retry_max: float = 30.0
    window_lookback: float = 300.0


@dataclass(frozen=True)
class Answer:
    status: int
    detail: str = ""


class Receiver:
    """Turns one notification into queued patient references. Answers 2xx only once they are on disk, so the
    FHIR server retries (HAPI: for about 60 s) whatever was not recorded. Every id and reference is checked with
    the FHIR id rules (leukofhir/fhir/ids.py) before a URL or a queue entry is made of it."""

    def __init__(self, queue: PatientQueue, fhir: FhirClient | None, base_url: str | None = None):
        self.queue = queue
        self.fhir = fhir
        # A subject given as an absolute URL names a Patient of this server only under its base URL.
        self.base_url = (base_url or (fhir.base_url if fhir else "")).rstrip("/") + "/"
        self.empty_posts = 0

    def handle(self, method: str, raw_path: str, body: bytes) -> Answer:
        """`raw_path` as the client sent it (percent-encoded): split first, then each segment decoded, so that an
        encoded `/` stays inside its segment and is refused with it."""
        if method == "POST" and not body.strip():
            return self._empty_post()
        parts = [unquote(p) for p in raw_path.split("/") if p]
        if method not in ("PUT", "DELETE") or len(parts) < 2:
            return Answer(404, "expected PUT or DELETE {endpoint}/{type}/{id}, or an empty POST {endpoint}")
        resource_type, resource_id = parts[-2], parts[-1]
        if resource_type not in WATCHED_TYPES:
            return Answer(404, f"{shown(resource_type)} is not a resource type this receiver watches")
        try:
            ref = resource_path(resource_type, resource_id)
        except InvalidIdError as exc:
            return Answer(400, f"{resource_type}: {exc}")
        if method == "PUT":
            try:
                resource = parse_json(body)
            except BadBody as exc:
                return Answer(400, f"{ref}: {exc}")
            if (
                not isinstance(resource, dict)
                or resource.get("resourceType") != resource_type
                or str(resource.get("id", resource_id)) != resource_id
            ):
                return Answer(400, f"{ref}: the body is not that resource")
        else:
            resource = self._last_version(ref)
            if isinstance(resource, Answer):
                return resource
        try:
            patient = patient_of(resource, self.base_url) if resource else None
        except InvalidReferenceError as exc:
            if method == "PUT":
                return Answer(400, f"{ref}: {exc}")
            # The server's own last version names it: nothing the server could send better by retrying.
            log.warning("DELETE %s: %s; nothing queued", ref, exc)
            return Answer(200)
        if patient is None:
            # Nothing to evaluate (the pipeline quarantines a result without a Patient subject): acknowledged,
            # so the server does not retry it.
            log.info("%s %s: no Patient subject; nothing queued", method, ref)
            return Answer(200)
        self.queue.add([patient])
        log.debug("%s %s: %s queued", method, ref, patient)
        return Answer(200)

    def _last_version(self, ref: str) -> dict | None | Answer:
        """The newest version with content of a deleted resource (`ref` checked): a DELETE notification carries no
        body. The one request made: that resource's own `_history`."""
        if self.fhir is None:
            log.warning("DELETE %s: no FHIR server configured to look up its patient", ref)
            return None
        try:
            bundle = self.fhir.request(
                "GET", f"{ref}/_history", params={"_count": 10}, headers={"Cache-Control": "no-cache"}
            ).json()
        except FatalFhirError as exc:
            if exc.status in (404, 410):
                log.warning("DELETE %s: the server has no history of it", ref)
                return None
            raise
        except FhirError as exc:
            # The server retries the notification: the deletion is not lost while it does.
            log.warning("DELETE %s: cannot read its history now (%s)", ref, exc)
            return Answer(503, "cannot look up the deleted resource's patient now")
        for entry in bundle.get("entry") or []:
            if isinstance(entry.get("resource"), dict):
                return entry["resource"]
        return None

    def _empty_post(self) -> Answer:
        # A Subscription without payload (R4: "no payload ... just a notification"): the server says that something
        # matched and nothing more. Ours always carry a payload, but a site may keep patient data off the hook
        # channel, or its server may not send payloads: a window run finds what changed
        # (docs/near-real-time.md).
        self.empty_posts += 1
        self.queue.add_window_request()
        log.info("notification without payload (empty POST): a surveillance run over the last minutes will follow")
        return Answer(200)


class InvalidReferenceError(ValueError):
    """A subject that names a Patient, but not one of this server by a valid FHIR id."""


def patient_of(resource: dict, base_url: str) -> str | None:
    """'Patient/<id>' of the resource's subject; None when the subject names no Patient (a Group, a urn, none);
    InvalidReferenceError when it names one that is not a Patient of the server at `base_url` by a FHIR id."""
    reference = subject_of(resource)
    kind, rid = reference_target(reference)
    if kind != "Patient":
        return None
    # Only a FHIR id goes on: the DAG's Param refuses anything else, and one refused run would hold its whole batch.
    pid = local_patient_id(reference, base_url)
    if pid is not None:
        return f"Patient/{pid}"
    if not is_valid_id(rid):
        raise InvalidReferenceError(f"subject {shown(reference, 200)}: {shown(rid)} is not a valid FHIR id")
    raise InvalidReferenceError(f"subject {shown(reference, 200)} is a Patient of another server than {base_url}")


class Dispatcher:
    """Forms batches from the queue and starts their Airflow runs, in a background thread."""

    def __init__(
        self,
        queue: PatientQueue,
        airflow: AirflowClient,
        policy: BatchPolicy,
        *,
        dag_id: str = DAG_ID,
        window_dag_id: str = WINDOW_DAG_ID,
        clock=time.time,
        tick: float = 0.2,
    ):
        self.queue, self.airflow, self.policy = queue, airflow, policy
        self.dag_id, self.window_dag_id = dag_id, window_dag_id
        self._clock, self._tick = clock, tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leukofhir-dispatcher", daemon=True)
        self.stats = {"runs_created": 0, "runs_existing": 0, "trigger_failures": 0}

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # the loop must outlive any one failure; the queue keeps the patients
                log.exception("dispatcher step failed; trying again")
            self._stop.wait(self._tick)

    def step(self) -> None:
        """Form the batches that are due, then try every batch whose time has come."""
        while self._batch_due():
            batch = self.queue.form_batch(self.policy.max_patients, RUN_ID_PREFIX)
            if batch is None:
                break
            log.info("batch %s formed: %d patient(s)", batch.run_id, len(batch.patients))
        if self._due(self.queue.window_state()):
            batch = self.queue.form_window_batch(self.policy.window_lookback, WINDOW_RUN_ID_PREFIX)
            if batch is not None:
                log.info("batch %s formed: window %s to %s", batch.run_id, *batch.window)
        for batch in self.queue.due_batches():
            if self._stop.is_set():
                return
            self._send(batch)

    def _batch_due(self) -> bool:
        state = self.queue.pending_state()
        return self._due(state) or state.count >= self.policy.max_patients

    def _due(self, state) -> bool:
        if not state.count:
            return False
        now = self._clock()
        return now - state.last_seen >= self.policy.debounce or now - state.first_seen >= self.policy.max_wait

    def _send(self, batch: Batch) -> None:
        if batch.window:
            dag_id, conf = self.window_dag_id, {"start": batch.window[0], "end": batch.window[1]}
            what = f"window {batch.window[0]} to {batch.window[1]}"
        else:
            dag_id, conf = self.dag_id, {"patients": batch.patients}
            what = f"{len(batch.patients)} patient(s)"
        try:
            outcome = self.airflow.trigger_dag_run(dag_id, batch.run_id, conf, note=f"leukofhir listen: {what}")
        except AirflowError as exc:
            delay = min(2.0**batch.attempts, self.policy.retry_max)
            self.stats["trigger_failures"] += 1
            log.warning("run %s (%s) not accepted: %s; trying again in %.0f s", batch.run_id, what, exc, delay)
            self.queue.retry_later(batch, delay)
            return
        self.queue.accepted(batch)
        self.stats["runs_created" if outcome == "created" else "runs_existing"] += 1
        log.info(
            "run %s of %s %s: %s",
            batch.run_id,
            dag_id,
            "created" if outcome == "created" else "already existed (an earlier answer was lost)",
            what,
        )


def create_app(receiver: Receiver, secret: str, dispatcher: Dispatcher | None = None) -> FastAPI:
    """The FastAPI application: any path takes notifications (the FHIR server appends /Type/id to the
    endpoint); GET /healthz answers without the secret, with counts only."""

    @asynccontextmanager
    async def lifespan(app):
        if dispatcher is not None:
            dispatcher.start()
        try:
            yield
        finally:
            if dispatcher is not None:
                await run_in_threadpool(dispatcher.stop)

    app = FastAPI(title="leukofhir listen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz():
        counts = await run_in_threadpool(receiver.queue.counts)
        return dict(counts, status="ok", **(dispatcher.stats if dispatcher else {}))

    @app.api_route("/{path:path}", methods=["PUT", "DELETE", "POST"])
    async def notification(path: str, request: Request):
        # Refusals are logged, summarised, by the service's RequestGuard from these answers (leukofhir/service).
        if not is_authorized(request.headers.get("authorization"), secret):
            return JSONResponse(
                {"detail": "no valid shared secret"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        body = await request.body()  # counted as it arrives, refused at MAX_BODY_BYTES (leukofhir/service)
        raw_path = request.scope["raw_path"].decode("latin-1")
        answer = await run_in_threadpool(receiver.handle, request.method, raw_path, body)
        if answer.status < 300:
            return Response(status_code=answer.status)
        return JSONResponse({"detail": answer.detail}, status_code=answer.status)

    return app


def listen_command(args) -> int:
    from leukofhir.fhir.auth import make_auth
    from leukofhir.realtime.airflow_api import AirflowSettings
    from leukofhir.realtime.secret import hook_secret
    from leukofhir.realtime.subscribe import check_endpoint
    from leukofhir.service import limits as service_limits
    from leukofhir.service.logs import Refusals
    from leukofhir.service.server import serve

    secret = hook_secret()
    limits = service_limits.from_arguments(args, LIMITS)
    airflow = AirflowClient(AirflowSettings.from_environment(args.airflow_url))
    policy = BatchPolicy(
        debounce=args.debounce,
        max_wait=args.max_wait,
        max_patients=args.max_batch,
        retry_max=args.retry_max,
        window_lookback=args.window_lookback,
    )
    queue = PatientQueue(args.queue)
    # Read while the FHIR server waits for our answer: short, one retry; a failure answers 503 (it retries).
    fhir = FhirClient(args.fhir_url, make_auth(args.auth), timeout=min(args.timeout, 10.0), max_retries=1)
    scheme = "https" if args.ssl_certfile else "http"
    if scheme == "http":
        check_endpoint(f"http://{args.host}:{args.port}/")  # warns when plain http leaves loopback
    app = create_app(Receiver(queue, fhir), secret, Dispatcher(queue, airflow, policy))
    log.info("starting on %s://%s:%d (queue %s: %s)", scheme, args.host, args.port, queue.path, queue.counts())
    try:
        serve(
            app,
            name="leukofhir listen",
            host=args.host,
            port=args.port,
            limits=limits,
            refusals=Refusals(log),
            certfile=args.ssl_certfile,
            keyfile=args.ssl_keyfile,
        )
    finally:
        queue.close()
        airflow.close()
        fhir.close()
    return 0
