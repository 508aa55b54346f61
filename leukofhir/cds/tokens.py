"""The EHR's JWT on a CDS Hooks request (CDS Hooks 2.0, "Trusting CDS Clients"), checked against the trusted
issuers' JWKS."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import requests

from leukofhir.errors import UsageError
from leukofhir.fhir.ids import shown

log = logging.getLogger(__name__)

ALGORITHMS = ["RS384", "ES384"]  # the two the specification names
LEEWAY = 60  # seconds of clock difference allowed on exp/iat/nbf
JWKS_TIMEOUT = 10.0
JWKS_REFRESH = 60.0  # an unknown `kid` fetches a JWKS URL again at most this often (a rotated key is picked up)
MAX_TOKEN_BYTES = 16 * 1024


class TokenRefused(Exception):
    """A request whose JWT is missing or not acceptable: answered 401 with this message (no token content)."""


@dataclass
class Issuer:
    """One trusted issuer (`iss`) and where its public keys are: a JWKS file or an https URL."""

    iss: str
    source: str
    _keys: dict = field(default_factory=dict)  # kid -> key
    _fetched: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def key(self, kid: str):
        with self._lock:
            if kid not in self._keys and time.monotonic() - self._fetched >= JWKS_REFRESH:
                self._load()
            return self._keys.get(kid)

    def _load(self) -> None:
        self._fetched = time.monotonic()
        try:
            if self.source.startswith(("https://", "http://")):
                answer = requests.get(self.source, timeout=JWKS_TIMEOUT, headers={"Accept": "application/json"})
                answer.raise_for_status()
                document = answer.json()
            else:
                document = json.loads(Path(self.source).read_text(encoding="utf-8"))
            keys = jwt.PyJWKSet.from_dict(document).keys
        except (OSError, ValueError, requests.RequestException, jwt.PyJWTError) as exc:
            log.warning(
                "the JWKS of issuer %s (%s) cannot be read: %s", shown(self.iss, 200), self.source, type(exc).__name__
            )
            return
        self._keys = {k.key_id: k for k in keys if k.key_id}


def parse_trusted(values: list[str] | None) -> dict[str, Issuer]:
    """`--trusted-issuer ISS=JWKS_FILE_OR_URL` options as issuers by `iss` (the last `=` splits: an iss may hold
    one)."""
    issuers: dict[str, Issuer] = {}
    for value in values or []:
        iss, sep, source = value.rpartition("=")
        if not sep or not iss or not source:
            raise UsageError(f"--trusted-issuer {shown(value, 200)}: expected ISS=JWKS_FILE_OR_URL")
        if source.startswith("http://") and not source.startswith(("http://127.0.0.1", "http://localhost")):
            raise UsageError(f"--trusted-issuer {shown(iss, 200)}: a JWKS URL must be https (or loopback)")
        if not source.startswith(("https://", "http://")) and not Path(source).is_file():
            raise UsageError(f"--trusted-issuer {shown(iss, 200)}: no JWKS file {source}")
        issuers[iss] = Issuer(iss, source)
    return issuers


class TokenChecker:
    """Verifies `Authorization: Bearer <JWT>`: signed RS384 or ES384 by a key (`kid`) of its issuer's JWKS, `iss`
    trusted, `aud` the URL of the service called, `exp` in the future, a `jti` never seen before (remembered until
    its token expires). `check` does everything but the `jti`, `spend` records it: a service checks the token before
    it reads the body and spends it once the body is in."""

    def __init__(self, issuers: dict[str, Issuer], clock=time.time):
        self.issuers = issuers
        self._clock = clock
        self._seen: dict[str, float] = {}  # "iss|jti" -> exp
        self._lock = threading.Lock()

    def check(self, authorization: str | None, audience: str) -> dict:
        """The token's claims, or TokenRefused saying why."""
        if not authorization:
            raise TokenRefused("no Authorization header (the EHR's JWT is required)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenRefused("the Authorization header is not 'Bearer <JWT>'")
        token = token.strip()
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenRefused("the JWT is too long")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenRefused("the bearer token is not a JWT") from None
        if header.get("alg") not in ALGORITHMS:
            raise TokenRefused(f"the JWT's alg must be one of {', '.join(ALGORITHMS)}")
        issuer = self.issuers.get(unverified.get("iss")) if isinstance(unverified.get("iss"), str) else None
        if issuer is None:
            raise TokenRefused("the JWT's issuer (iss) is not trusted")
        kid = header.get("kid")
        key = issuer.key(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenRefused("the JWT's kid names no key of its issuer's JWKS")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[header["alg"]],
                audience=audience,
                issuer=issuer.iss,
                leeway=LEEWAY,
                options={"require": ["iss", "aud", "exp", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused("the JWT has expired") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused("the JWT's aud is not this service's URL") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused(f"the JWT has no {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            raise TokenRefused(f"the JWT is not valid ({type(exc).__name__})") from None
        if not isinstance(claims.get("jti"), str) or not claims["jti"]:
            raise TokenRefused("the JWT's jti is not a string")
        return claims

    def spend(self, claims: dict) -> None:
        """Record the token's `jti`; TokenRefused if it was used before (a replayed request)."""
        key = f"{claims['iss']}|{claims['jti']}"
        now = self._clock()
        with self._lock:
            if len(self._seen) > 1024:
                self._seen = {k: exp for k, exp in self._seen.items() if exp + LEEWAY >= now}
            if key in self._seen:
                raise TokenRefused("the JWT's jti was used before (a replayed request)")
            self._seen[key] = float(claims["exp"])
