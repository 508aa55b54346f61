"""The CDS Hooks 2.0 service (`leukofhir cds-hooks`): discovery at /cds-services, the patient-view and order-sign
services, each request's JWT checked before its body is read."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from leukofhir.cds.cards import order_card, patient_view_cards
from leukofhir.cds.evaluation import PassedBatches, evaluate_patient
from leukofhir.cds.fetch import BadHookRequest, PatientReader, prefetch_templates, prefetched_resources
from leukofhir.cds.orders import OrderMatcher
from leukofhir.cds.tokens import TokenChecker, TokenRefused
from leukofhir.config import Rules
from leukofhir.fhir.errors import FhirError
from leukofhir.fhir.ids import is_valid_id, shown
from leukofhir.service.bodies import BadBody, parse_json
from leukofhir.service.limits import Limits

log = logging.getLogger(__name__)

PATIENT_VIEW = "leukopenia-patient-view"
ORDER_SIGN = "leukopenia-order-sign"
LIMITS = Limits()  # a hook request with its prefetch: 5 MiB holds years of counts (benchmarks/cds_bench.py)


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict


class CdsService:
    """What the two services answer; HTTP-free, so the app only routes and checks tokens."""

    def __init__(self, rules: Rules, reader: PatientReader, public_url: str, as_of: datetime | None = None):
        self.rules, self.reader = rules, reader
        self.as_of = as_of  # None: as of each request's time, as a run evaluates as of its start
        self.public_url = public_url.rstrip("/")
        self.templates = prefetch_templates(rules)
        self.orders = OrderMatcher(rules, reader.base_url)
        self.validate = PassedBatches()

    def warm(self) -> None:
        """Validate one made-up result before the first request: GX's import and context take seconds, once."""
        count = {
            "resourceType": "Observation",
            "id": "warm",
            "status": "final",
            "subject": {"reference": "Patient/warm"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "6690-2"}]},
            "effectiveDateTime": "2020-01-01T00:00:00Z",
            "valueQuantity": {"value": 5.0, "system": "http://unitsofmeasure.org", "code": "10*9/L"},
        }
        evaluate_patient([count], "Patient/warm", self.rules, base_url=self.reader.base_url)

    def discovery(self) -> dict:
        return {
            "services": [
                {
                    "hook": "patient-view",
                    "id": PATIENT_VIEW,
                    "title": "Leukopenia surveillance",
                    "description": "Open leukopenia, neutropenia, agranulocytosis, lymphopenia and pancytopenia "
                    "episodes of the patient, by the same rules as the chart's Flags (CTCAE v5.0 grades).",
                    "prefetch": self.templates,
                },
                {
                    "hook": "order-sign",
                    "id": ORDER_SIGN,
                    "title": "Low counts and drugs that lower them",
                    "description": "A warning when a draft order is for a drug associated with low white counts "
                    "(clozapine, cytotoxic chemotherapy, valproate, interferons...) and the patient's counts are low.",
                    "prefetch": self.templates,
                },
            ]
        }

    def audience(self, path: str) -> str:
        return self.public_url + path

    def handle(self, service_id: str, body: bytes) -> Answer:
        try:
            request = parse_json(body)
        except BadBody as exc:
            return Answer(400, {"detail": str(exc)})
        hook = {PATIENT_VIEW: "patient-view", ORDER_SIGN: "order-sign"}[service_id]
        try:
            context = _check_request(request, hook)
            patient_id = context["patientId"]
            started = time.perf_counter()
            resources = prefetched_resources(request.get("prefetch"), self.templates)
            fetched = resources is None
            if fetched:
                resources = self.reader.read(patient_id, request.get("fhirServer"), request.get("fhirAuthorization"))
        except BadHookRequest as exc:
            return Answer(400, {"detail": str(exc)})
        except FhirError as exc:
            log.warning("%s Patient/%s: the FHIR server cannot be read now: %s", hook, patient_id, exc)
            return Answer(503, {"detail": "the patient's data cannot be read from the FHIR server now"})
        state = evaluate_patient(
            resources,
            f"Patient/{patient_id}",
            self.rules,
            base_url=self.reader.base_url,
            now=self.as_of,
            validate=self.validate,
        )
        if hook == "patient-view":
            cards = patient_view_cards(state, self.rules)
        else:
            drugs = self.rules.medications.drugs
            cards = [
                card
                for order in self.orders.listed_drugs(context.get("draftOrders"))
                if (card := order_card(order.drug_key, drugs[order.drug_key], order.reference, state, self.rules))
                is not None
            ]
        log.info(
            "%s Patient/%s: %d card(s), %s, %.0f ms",
            hook,
            patient_id,
            len(cards),
            "fetched" if fetched else "prefetched",
            (time.perf_counter() - started) * 1000,
        )
        return Answer(200, {"cards": cards})


def _check_request(request, hook: str) -> dict:
    """The request's context, checked (CDS Hooks 2.0 HTTP request: hook, hookInstance, context.patientId)."""
    if not isinstance(request, dict):
        raise BadHookRequest("the body is not a CDS Hooks request (a JSON object)")
    if request.get("hook") != hook:
        raise BadHookRequest(f"this service answers the {hook} hook, not {shown(str(request.get('hook')))}")
    if not isinstance(request.get("hookInstance"), str):
        raise BadHookRequest("hookInstance is missing")
    context = request.get("context")
    if not isinstance(context, dict) or not is_valid_id(context.get("patientId")):
        raise BadHookRequest("context.patientId is missing or not a FHIR id")
    if hook == "order-sign" and not isinstance(context.get("draftOrders"), dict):
        raise BadHookRequest("context.draftOrders (a Bundle) is missing")
    return context


def create_app(service: CdsService, tokens: TokenChecker, cors_origins: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="leukofhir cds-hooks", docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        # The CDS Hooks sandbox calls from the browser: its origin, configured, may read the answers.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    def refused(why: str) -> JSONResponse:
        return JSONResponse({"detail": why}, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/cds-services")
    async def discovery():
        # Public: it says which hooks are answered, never anything of a patient (docs/cds-hooks.md).
        return service.discovery()

    @app.post("/cds-services/{service_id}")
    async def hook(service_id: str, request: Request):
        path = f"/cds-services/{service_id}"
        try:
            claims = tokens.check(request.headers.get("authorization"), service.audience(path))
        except TokenRefused as exc:
            return refused(str(exc))
        if service_id not in (PATIENT_VIEW, ORDER_SIGN):
            return JSONResponse({"detail": "no such CDS service"}, status_code=404)
        body = await request.body()  # counted as it arrives, refused at the cap (leukofhir/service)
        try:
            tokens.spend(claims)  # once the body is in: a request cut off on its way never spends its token
        except TokenRefused as exc:
            return refused(str(exc))
        answer = await run_in_threadpool(service.handle, service_id, body)
        return JSONResponse(answer.body, status_code=answer.status)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def elsewhere(path: str, request: Request):
        try:
            tokens.check(request.headers.get("authorization"), service.audience("/" + path))
        except TokenRefused as exc:
            return refused(str(exc))
        return JSONResponse({"detail": "not found"}, status_code=404)

    return app
