"""A SMART Backend Services authorization server for the tests, and the bearer check of the proxy in front of HAPI.

The server really verifies each client assertion (RFC 7523 / SMART App Launch 2.x): the signature against the
client's registered public JWKS, `aud` = this token endpoint, `exp` not passed and at most five minutes ahead,
`iss` = `sub` = the client, `jti` never seen before. It issues opaque tokens; `gate` (for FaultProxy) lets through
only requests carrying a live one, answers `[base]/.well-known/smart-configuration`, and `revoke` withdraws tokens.
Everything secret it sees or makes is kept in `secrets`, so tests can grep every output for them."""

from __future__ import annotations

import json
import secrets as random_secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from support.ports import bind_loopback

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 300  # SMART: exp no more than five minutes in the future
CLOCK_LEEWAY = 60


class _Refusal(Exception):
    def __init__(self, status: int, error: str, description: str):
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


class SmartAuthServer:
    """`with SmartAuthServer() as auth:` then `auth.register(client_id, public_key, kid)`; `auth.token_url`."""

    def __init__(self, token_lifetime: int = 300):
        self.token_lifetime = token_lifetime
        self.clients: dict[str, dict] = {}
        self.tokens: dict[str, dict] = {}
        self.used_jti: set[str] = set()
        self.secrets: list[str] = []  # assertions received and tokens issued
        self.refusals: list[tuple[str, str]] = []  # (error, description) of each refused token request
        self.token_requests = 0
        self.revoke_on_issue = False  # every new token is revoked at once (access withdrawn at the resource server)
        self.lock = threading.Lock()
        auth = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                status, body = auth._token_request(self.path, form)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = bind_loopback(lambda address: ThreadingHTTPServer(address, Handler))
        self.server.daemon_threads = True
        self.token_url = f"http://127.0.0.1:{self.server.server_address[1]}/auth/token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SmartAuthServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- registration -------------------------------------------------------------------------------

    def register(self, client_id: str, public_key, kid: str) -> None:
        """Register a client's public key (its JWKS, as a SMART client registers one), under `kid`."""
        algorithm = RSAAlgorithm if isinstance(public_key, rsa.RSAPublicKey) else ECAlgorithm
        jwk = json.loads(algorithm.to_jwk(public_key))
        jwk.update(kid=kid, alg="RS384" if algorithm is RSAAlgorithm else "ES384")
        self.clients.setdefault(client_id, {"keys": [], "disabled": False})["keys"].append(jwk)

    # --- the token endpoint --------------------------------------------------------------------------

    def _token_request(self, path: str, form: dict) -> tuple[int, dict]:
        with self.lock:
            self.token_requests += 1
            if form.get("client_assertion"):
                self.secrets.append(form["client_assertion"])
            try:
                if path != "/auth/token":
                    raise _Refusal(404, "invalid_request", "no such endpoint")
                client_id, scope = self._verify(form)
            except _Refusal as refusal:
                self.refusals.append((refusal.error, refusal.description))
                return refusal.status, {"error": refusal.error, "error_description": refusal.description}
            token = random_secrets.token_urlsafe(32)
            self.secrets.append(token)
            self.tokens[token] = {
                "client_id": client_id,
                "expires_at": time.time() + self.token_lifetime,
                "revoked": self.revoke_on_issue,
            }
            return 200, {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.token_lifetime,
                "scope": scope,
            }

    def _verify(self, form: dict) -> tuple[str, str]:
        if form.get("grant_type") != "client_credentials":
            raise _Refusal(400, "unsupported_grant_type", "only client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
            raise _Refusal(400, "invalid_request", "a jwt-bearer client_assertion is required")
        assertion = form["client_assertion"]
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _Refusal(401, "invalid_client", "the client assertion is not a JWT") from None
        if header.get("alg") not in ("RS384", "ES384"):
            raise _Refusal(401, "invalid_client", f"algorithm {header.get('alg')} is not allowed (RS384, ES384)")
        client_id = unverified.get("iss")
        client = self.clients.get(client_id)
        if client is None:
            raise _Refusal(401, "invalid_client", f"unknown client {client_id!r}")
        if client["disabled"]:
            raise _Refusal(401, "invalid_client", f"client {client_id!r} is disabled")
        jwk = next((k for k in client["keys"] if k["kid"] == header.get("kid")), None)
        if jwk is None:
            raise _Refusal(401, "invalid_client", f"no key with kid {header.get('kid')!r} in the client's JWKS")
        try:
            claims = jwt.decode(
                assertion,
                jwt.PyJWK(jwk).key,
                algorithms=[jwk["alg"]],
                audience=self.token_url,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.InvalidSignatureError:
            raise _Refusal(
                401,
                "invalid_client",
                "the assertion's signature does not verify with the client's "
                f"registered key {jwk['kid']!r} (signed with another key?)",
            ) from None
        except jwt.ExpiredSignatureError:
            raise _Refusal(
                401, "invalid_client", "the client assertion has expired (exp is in the past: check the client's clock)"
            ) from None
        except jwt.InvalidAudienceError:
            raise _Refusal(401, "invalid_client", "the assertion's aud is not this token endpoint") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _Refusal(401, "invalid_client", f"the assertion lacks the {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            raise _Refusal(401, "invalid_client", f"invalid assertion ({type(exc).__name__})") from None
        if claims["sub"] != client_id:
            raise _Refusal(401, "invalid_client", "the assertion's sub is not its iss")
        if claims["exp"] > time.time() + MAX_ASSERTION_LIFETIME + CLOCK_LEEWAY:
            raise _Refusal(401, "invalid_client", "the assertion's exp is more than five minutes ahead")
        if claims["jti"] in self.used_jti:
            raise _Refusal(401, "invalid_client", "the assertion's jti was already used (a replayed assertion)")
        self.used_jti.add(claims["jti"])
        return client_id, form.get("scope", "")

    # --- the resource server's side: the proxy's bearer check ---------------------------------------

    def gate(self, method: str, path: str, headers: dict):
        """For FaultProxy: None lets the request through; otherwise (status, headers, body)."""
        if path.split("?")[0].endswith("/.well-known/smart-configuration"):
            config = {
                "token_endpoint": self.token_url,
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                "capabilities": ["client-confidential-asymmetric"],
            }
            return 200, {"Content-Type": "application/json"}, json.dumps(config)
        value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        scheme, _, token = value.partition(" ")
        with self.lock:
            record = self.tokens.get(token) if scheme.lower() == "bearer" else None
            if record is None:
                why = "no bearer token" if not token else "unknown token"
            elif record["revoked"]:
                why = "the access token has been revoked"
            elif record["expires_at"] < time.time():
                why = "the access token has expired"
            else:
                return None
        challenge = f'Bearer error="invalid_token", error_description="{why}"'
        return (
            401,
            {"WWW-Authenticate": challenge, "Content-Type": "application/fhir+json"},
            json.dumps(
                {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "login", "diagnostics": why}],
                }
            ),
        )

    def revoke(self, token: str | None = None) -> None:
        """Revoke one token, or every live one."""
        with self.lock:
            for value, record in self.tokens.items():
                if token is None or value == token:
                    record["revoked"] = True

    def live_tokens(self) -> list[str]:
        with self.lock:
            return [t for t, r in self.tokens.items() if not r["revoked"] and r["expires_at"] > time.time()]
