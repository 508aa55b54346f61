"""`leukofhir cds-hooks` run as its own process on a loopback port, and an EHR's signing keys (RS384 and ES384, a JWKS
file) to call it with, for tests and the benchmark."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from support.hostile import Target
from support.processes import ServiceProcess

ISSUER = "https://ehr.example.org"
PATIENT_VIEW = "/cds-services/leukopenia-patient-view"
ORDER_SIGN = "/cds-services/leukopenia-order-sign"


class EhrKeys:
    """An EHR's two signing keys (kid "rs" RS384, kid "es" ES384) and its public JWKS written to `folder`."""

    def __init__(self, folder: Path, issuer: str = ISSUER):
        self.issuer = issuer
        self.keys = {
            "rs": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS384"),
            "es": (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        }
        jwks = {"keys": []}
        for kid, (key, alg) in self.keys.items():
            public = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
            jwks["keys"].append(dict(public, kid=kid, alg=alg, use="sig"))
        self.jwks = Path(folder) / "ehr-jwks.json"
        self.jwks.write_text(json.dumps(jwks), encoding="utf-8")

    def token(
        self,
        audience: str,
        *,
        kid: str = "es",
        expires_in: int = 300,
        jti: str | None = None,
        issuer: str | None = None,
        **claims,
    ) -> str:
        key, alg = self.keys[kid]
        now = int(time.time())
        body = {
            "iss": issuer or self.issuer,
            "sub": "ehr-client",
            "aud": audience,
            "iat": now,
            "exp": now + expires_in,
            "jti": jti or uuid.uuid4().hex,
            **claims,
        }
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})

    def header(self, audience: str, **kwargs) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(audience, **kwargs)}"}


class CdsProcess(ServiceProcess):
    name = "leukofhir cds-hooks"

    def __init__(
        self,
        workdir: Path,
        port: int,
        fhir_url: str,
        keys: EhrKeys,
        *,
        args: tuple[str, ...] = (),
        nofile: int | None = None,
        tls: tuple[Path, Path] | None = None,
        env: dict | None = None,
    ):
        super().__init__(workdir, port, "cds-hooks.log", env or dict(os.environ), nofile=nofile, tls=tls)
        self.keys = keys
        self.cmd = [
            sys.executable,
            "-m",
            "leukofhir.cli",
            "-v",
            "cds-hooks",
            "--port",
            str(port),
            "--fhir-url",
            fhir_url,
            "--public-url",
            self.url,
            "--trusted-issuer",
            f"{keys.issuer}={keys.jwks}",
            *args,
            *self.tls_args,
        ]

    def auth(self, path: str = PATIENT_VIEW, **kwargs) -> dict[str, str]:
        """Headers with a fresh JWT for the service at `path` (a jti is single-use)."""
        return self.keys.header(self.url + path, **kwargs)


def patient_view_request(patient_id: str, prefetch: dict | None = None, **extra) -> dict:
    """A patient-view request shaped as the CDS Hooks 2.0 specification's example."""
    request = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "patient-view",
        "context": {"userId": "Practitioner/example", "patientId": patient_id},
        **extra,
    }
    if prefetch is not None:
        request["prefetch"] = prefetch
    return request


def order_sign_request(patient_id: str, orders: list[dict], prefetch: dict | None = None, **extra) -> dict:
    """An order-sign request: the draft MedicationRequests in context.draftOrders, a Bundle."""
    request = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "order-sign",
        "context": {
            "userId": "Practitioner/example",
            "patientId": patient_id,
            "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": o} for o in orders]},
        },
        **extra,
    }
    if prefetch is not None:
        request["prefetch"] = prefetch
    return request


def draft_order(order_id: str, patient_id: str, *, rxnorm: str | None = None, text: str | None = None) -> dict:
    concept: dict = {}
    if rxnorm:
        concept["coding"] = [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": rxnorm}]
    if text:
        concept["text"] = text
    return {
        "resourceType": "MedicationRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient_id}"},
        "medicationCodeableConcept": concept,
    }


@contextmanager
def cds_service(
    workdir: Path,
    port: int,
    *,
    nofile: int | None = None,
    tls: tuple[Path, Path] | None = None,
    fhir_url: str = "http://127.0.0.1:9/fhir",
) -> Iterator[Target]:
    """The CDS service as the hostile-client tests see it (tests/support/hostile.py): a valid request is a
    patient-view with a complete (empty) prefetch, so no FHIR server is needed."""
    keys = EhrKeys(workdir)
    with CdsProcess(workdir, port, fhir_url, keys, nofile=nofile, tls=tls) as service:
        from leukofhir.cds.fetch import prefetch_templates
        from leukofhir.config import load_config

        empty = {
            key: {"resourceType": "Bundle", "type": "searchset", "entry": []}
            for key in prefetch_templates(load_config())
        }
        empty["patient"] = {"resourceType": "Patient", "id": "hostile"}

        def valid() -> tuple[str, str, bytes]:
            return "POST", PATIENT_VIEW, json.dumps(patient_view_request("hostile", empty)).encode()

        yield Target(
            port=port,
            pid=service.proc.pid,
            log=service.log,
            scheme="https" if tls else "http",
            verify=service.verify,
            auth=service.auth,
            valid=valid,
            json_target=("POST", PATIENT_VIEW),
        )
