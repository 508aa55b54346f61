"""Secrets read, stripped and checked without ever being shown; SMART keys, kids and assertions."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from requests.auth import HTTPBasicAuth

from leukofhir.errors import UsageError
from leukofhir.fhir.auth import BearerAuth, make_auth
from leukofhir.fhir.secrets import check_token, clean_secret, secret
from leukofhir.fhir.smart import ASSERTION_LIFETIME, SmartBackendAuth, jwk_thumbprint, load_private_key

SECRET = "s3cr3t-Value"


def _pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize("raw", [f"{SECRET}\n", f"  {SECRET}\r\n", f"\t{SECRET}"])
def test_surrounding_whitespace_is_stripped(raw):
    assert clean_secret(raw, "X") == SECRET and check_token(raw, "X") == SECRET


@pytest.mark.parametrize(
    "raw, message",
    [
        (f"{SECRET}\nmore", "line break"),
        (f"{SECRET}\x00", "control character"),
        ("  \n", "empty"),
    ],
)
def test_bad_secrets_are_refused_by_name_only(raw, message):
    with pytest.raises(UsageError, match=message) as err:
        clean_secret(raw, "LEUKOFHIR_FHIR_TOKEN")
    assert "LEUKOFHIR_FHIR_TOKEN" in str(err.value) and SECRET not in str(err.value)


@pytest.mark.parametrize("raw", [f"{SECRET} x", f"{SECRET},x", "tök"])
def test_a_bearer_token_must_be_rfc6750(raw):
    with pytest.raises(UsageError, match="bearer token") as err:
        check_token(raw, "T")
    assert raw not in str(err.value)


def test_secret_from_a_file_is_stripped_and_named_by_its_variable(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"{SECRET}\n")
    assert secret("T", {"T_FILE": str(path)}) == SECRET
    path.write_text(f"{SECRET}\n{SECRET}\n")
    with pytest.raises(UsageError, match=f"T_FILE \\({path}\\)"):
        secret("T", {"T_FILE": str(path)})
    with pytest.raises(UsageError, match="cannot read T_FILE"):
        secret("T", {"T_FILE": str(tmp_path / "missing")})


def test_auth_from_environment_and_files(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    auth = make_auth(None, environ={"LEUKOFHIR_FHIR_TOKEN_FILE": str(token_file)})
    assert isinstance(auth, BearerAuth) and auth._token == "s3cret" and "s3cret" not in repr(auth)
    token_file.write_text("rotated")
    auth.refresh()
    assert auth._token == "rotated"
    basic = make_auth(None, environ={"LEUKOFHIR_FHIR_USER": "u", "LEUKOFHIR_FHIR_PASSWORD": "pässword\n"})
    assert isinstance(basic, HTTPBasicAuth) and basic.password == "pässword".encode()
    assert make_auth(None, environ={}) is None


@pytest.mark.parametrize(
    "kind, environ",
    [
        ("bearer", {}),
        ("basic", {"LEUKOFHIR_FHIR_USER": "u"}),
        ("kerberos", {}),
        ("smart", {"LEUKOFHIR_SMART_CLIENT_ID": "c"}),
    ],
)
def test_auth_refuses_incomplete_settings(kind, environ):
    with pytest.raises(UsageError):
        make_auth(kind, environ=environ, base_url="https://h/fhir")


def test_rfc7638_thumbprint_example():
    # RFC 7638 §3.1: this RSA key's thumbprint is NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
        "oknjhMs"
        "tn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL"
        "5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    number = int.from_bytes(jwt.utils.base64url_decode(n), "big")
    key = rsa.RSAPublicNumbers(65537, number).public_key()
    assert jwk_thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_only_smart_key_types_are_taken():
    assert load_private_key(_pem(rsa.generate_private_key(65537, 2048)), "k")[1] == "RS384"
    assert load_private_key(_pem(ec.generate_private_key(ec.SECP384R1())), "k")[1] == "ES384"
    with pytest.raises(UsageError, match="P-384"):
        load_private_key(_pem(ec.generate_private_key(ec.SECP256R1())), "k")
    with pytest.raises(UsageError, match="too short"):
        load_private_key(_pem(rsa.generate_private_key(65537, 1024)), "k")
    with pytest.raises(UsageError, match="not an unencrypted PEM") as err:
        load_private_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "the key file k.pem")
    assert "k.pem" in str(err.value)


def test_the_assertion_carries_what_smart_requires():
    key = rsa.generate_private_key(65537, 2048)
    auth = SmartBackendAuth(client_id="c1", private_key=_pem(key), token_url="https://auth.example/token")
    first, second = auth._assertion(auth.token_url), auth._assertion(auth.token_url)
    header = jwt.get_unverified_header(first)
    assert header["alg"] == "RS384" and header["kid"] == jwk_thumbprint(key.public_key()) and header["typ"] == "JWT"
    claims = jwt.decode(first, key.public_key(), algorithms=["RS384"], audience="https://auth.example/token")
    assert claims["iss"] == claims["sub"] == "c1"
    assert 0 < claims["exp"] - time.time() <= min(ASSERTION_LIFETIME, 300)
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]
    assert "PRIVATE" not in repr(auth)
