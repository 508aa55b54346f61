"""SMART Backend Services (SMART App Launch 2.x): a client assertion JWT signed with the client's private key buys
an access token, cached and refreshed before it expires (and once more on a 401)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
import uuid
from typing import Callable

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from requests.auth import AuthBase

from leukofhir.errors import UsageError
from leukofhir.fhir.errors import SmartAuthError, TemporaryFhirError
from leukofhir.fhir.http import TEMPORARY_STATUSES, retry_delay
from leukofhir.fhir.secrets import check_token
from leukofhir.fhir.urls import redact_url

log = logging.getLogger(__name__)

# SMART v2 scopes for what the pipeline reads (rs = read + search) and writes (Flags; the Device named as their
# author). A server still on SMART v1 takes e.g. "system/*.read system/Flag.write" instead: scopes pass as given.
DEFAULT_SCOPES = (
    "system/Patient.rs system/Observation.rs system/DiagnosticReport.rs system/Medication.rs "
    "system/MedicationRequest.rs system/MedicationStatement.rs system/MedicationAdministration.rs "
    "system/Flag.cruds system/Device.crus"
)
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services: the assertion's exp is "no more than five minutes in the future"; a little less, so a
# client clock slightly ahead of the server's is still accepted.
ASSERTION_LIFETIME = 240
DEFAULT_TOKEN_LIFETIME = 300  # when the token response omits expires_in


def load_private_key(pem: str | bytes, where: str):
    """An unencrypted PEM private key, RSA (signs RS384) or EC P-384 (signs ES384), as SMART requires."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # cryptography's message never quotes key material, but say only what we know.
        raise UsageError(f"{where} is not an unencrypted PEM private key (RSA, or EC on P-384)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise UsageError(f"{where}: an RSA key of {key.key_size} bits is too short (at least 2048)")
        return key, "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return key, "ES384"
    raise UsageError(f"{where}: SMART Backend Services signs with RSA (RS384) or EC P-384 (ES384) keys only")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_thumbprint(public_key) -> str:
    """RFC 7638 thumbprint of a public key: the default `kid`, matching a JWKS that uses thumbprints as kids."""
    numbers = public_key.public_numbers()
    if isinstance(public_key, rsa.RSAPublicKey):
        n, e = numbers.n, numbers.e
        members = {
            "e": _b64(e.to_bytes((e.bit_length() + 7) // 8, "big")),
            "kty": "RSA",
            "n": _b64(n.to_bytes((n.bit_length() + 7) // 8, "big")),
        }
    else:
        size = (public_key.curve.key_size + 7) // 8
        members = {
            "crv": "P-384",
            "kty": "EC",
            "x": _b64(numbers.x.to_bytes(size, "big")),
            "y": _b64(numbers.y.to_bytes(size, "big")),
        }
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64(hashlib.sha256(canonical).digest())


class SmartBackendAuth(AuthBase):
    """`Authorization: Bearer <token>` with a token from the SMART token endpoint (client credentials grant,
    `private_key_jwt` client authentication). The token endpoint is given, or discovered from
    `[base]/.well-known/smart-configuration`. Nothing secret is ever logged or put in a message."""

    def __init__(
        self,
        *,
        client_id: str,
        private_key: str | bytes,
        base_url: str | None = None,
        token_url: str | None = None,
        key_id: str | None = None,
        scopes: str = DEFAULT_SCOPES,
        key_source: str = "the private key",
        timeout: float = 30.0,
        max_retries: int = 2,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not client_id:
            raise UsageError("SMART Backend Services needs a client id")
        if not token_url and not base_url:
            raise UsageError("SMART Backend Services needs the token endpoint or the FHIR base URL to discover it")
        self.client_id = client_id
        self._key, self.algorithm = load_private_key(private_key, key_source)
        self.key_id = key_id or jwk_thumbprint(self._key.public_key())
        self.scopes = " ".join(scopes.split())
        self.base_url = base_url.rstrip("/") + "/" if base_url else None
        self._token_url = token_url
        self.timeout = timeout
        self.max_retries = max_retries
        self._clock = clock
        self._sleep = sleep
        self._session = requests.Session()
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self.client_id!r}, key_id={self.key_id!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        return request

    def token(self) -> str:
        """The cached access token, fetched anew when it is about to expire."""
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                self._fetch()
            return self._token  # type: ignore[return-value]

    def refresh(self) -> None:
        """Forget the token and get a fresh one now (the FHIR server answered 401)."""
        with self._lock:
            self._token = None
            self._fetch()

    # --- the token endpoint ---------------------------------------------------------------------------

    @property
    def token_url(self) -> str:
        if self._token_url is None:
            self._token_url = self._discover()
        return self._token_url

    def _discover(self) -> str:
        """SMART App Launch 2.x §Discovery: `token_endpoint` of `[base]/.well-known/smart-configuration`."""
        where = f"{self.base_url}.well-known/smart-configuration"
        shown = redact_url(where)
        try:
            response = self._session.get(
                where, headers={"Accept": "application/json"}, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise TemporaryFhirError(f"SMART discovery: GET {shown} failed ({type(exc).__name__})", url=shown) from None
        if response.status_code != 200:
            raise SmartAuthError(
                f"SMART discovery: GET {shown} answered HTTP {response.status_code}; give the token "
                "endpoint instead (smart_token_url / LEUKOFHIR_SMART_TOKEN_URL)",
                status=response.status_code,
                url=shown,
            )
        try:
            endpoint = response.json().get("token_endpoint")
        except (ValueError, AttributeError):
            endpoint = None
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            raise SmartAuthError(f"SMART discovery: {shown} names no token_endpoint", url=shown)
        if endpoint.startswith("http://") and where.startswith("https://"):
            raise SmartAuthError(f"SMART discovery: {shown} names a token endpoint without TLS", url=shown)
        log.info("SMART token endpoint %s (from %s)", redact_url(endpoint), shown)
        return endpoint

    def _assertion(self, token_url: str) -> str:
        # The claims SMART Backend Services requires, and no iat: a server checks iat against its own clock, and a
        # client clock a little ahead would make the assertion "issued in the future".
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "exp": int(self._clock()) + ASSERTION_LIFETIME,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.key_id, "typ": "JWT"})

    def _fetch(self) -> None:
        token_url = self.token_url
        shown = redact_url(token_url)
        attempt = 0
        while True:
            # A fresh assertion (fresh jti) per try: the endpoint refuses a replayed one.
            assertion = self._assertion(token_url)
            form = {
                "grant_type": "client_credentials",
                "scope": self.scopes,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
            }
            try:
                response = self._session.post(
                    token_url,
                    data=form,
                    headers={"Accept": "application/json"},
                    timeout=self.timeout,
                    allow_redirects=False,
                )
                status, reason = response.status_code, f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                response, status, reason = None, None, type(exc).__name__
            if status is None or status in TEMPORARY_STATUSES:
                attempt += 1
                if attempt > self.max_retries:
                    raise TemporaryFhirError(
                        f"SMART token endpoint {shown}: no token after {attempt} tries ({reason})",
                        status=status,
                        url=shown,
                    )
                delay = retry_delay(attempt, response.headers.get("Retry-After") if response is not None else None)
                log.warning(
                    "SMART token endpoint %s: %s; retry %d of %d in %.1fs",
                    shown,
                    reason,
                    attempt,
                    self.max_retries,
                    delay,
                )
                self._sleep(delay)
                continue
            body = self._body(response)
            if status != 200:
                raise SmartAuthError(self._refusal(shown, status, body, assertion), status=status, url=shown)
            self._accept(body, shown)
            return

    @staticmethod
    def _body(response: requests.Response) -> dict:
        try:
            body = response.json()
        except (ValueError, RecursionError):
            return {}
        return body if isinstance(body, dict) else {}

    @staticmethod
    def _refusal(shown: str, status: int, body: dict, assertion: str) -> str:
        """RFC 6749 §5.2 error and error_description: the endpoint says which check failed."""
        error = str(body.get("error") or "no error code")
        description = " ".join(str(body.get("error_description") or "").split())[:300]
        description = description.replace(assertion, "<assertion>")  # never echo what we sent
        return f"SMART token endpoint {shown} refused the client (HTTP {status}): {error}" + (
            f": {description}" if description else ""
        )

    def _accept(self, body: dict, shown: str) -> None:
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise SmartAuthError(f"SMART token endpoint {shown} answered without an access_token", url=shown)
        if str(body.get("token_type", "")).lower() != "bearer":
            raise SmartAuthError(
                f"SMART token endpoint {shown}: token_type {body.get('token_type')!r} is not bearer", url=shown
            )
        token = check_token(token, f"the access token from {shown}")
        try:
            lifetime = float(body.get("expires_in", DEFAULT_TOKEN_LIFETIME))
        except (TypeError, ValueError):
            lifetime = DEFAULT_TOKEN_LIFETIME
        granted = set(str(body.get("scope") or self.scopes).split())
        missing = [s for s in self.scopes.split() if s not in granted]
        if missing:
            log.warning(
                "SMART token endpoint %s granted fewer scopes than asked; missing: %s", shown, " ".join(missing)
            )
        self._token = token
        # Refresh ahead of expiry (half the lifetime at most a minute early), so no request carries a token
        # that expires in flight.
        self._refresh_at = self._clock() + lifetime - min(60.0, lifetime / 2)
        log.info("SMART access token obtained from %s for client %s (valid %ds)", shown, self.client_id, int(lifetime))
