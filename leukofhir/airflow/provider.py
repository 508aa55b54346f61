"""Airflow provider metadata: registers the `fhir` connection type, its hook and its form (entry point
apache_airflow_provider); importing it imports nothing from Airflow."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from leukofhir.fhir.auth_kinds import AUTH_KINDS


def _version() -> str:
    try:
        return version("leukofhir")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0.0.0"


def _field(label: str, description: str, **schema) -> dict:
    return {"label": label, "description": description, "schema": schema}


# Extra fields of the connection form (Airflow ≥ 3.2 `conn-fields`: stored as plain keys of the extra JSON).
CONN_FIELDS = {
    "scheme": _field(
        "Scheme",
        "https (default) or http, when host is a bare host name",
        type="string",
        enum=["https", "http"],
        default="https",
    ),
    "auth": _field(
        "Authentication",
        "none, basic (login/password), bearer (token in password), or smart (SMART Backend Services)",
        type="string",
        enum=list(AUTH_KINDS),
    ),
    "timeout": _field("Timeout (s)", "seconds per HTTP request", type="number", minimum=1, default=60),
    "max_retries": _field(
        "Retries", "retries of a temporary failure per request", type="integer", minimum=0, maximum=10, default=4
    ),
    "smart_client_id": _field(
        "SMART client id", "the client id registered with the authorization server", type="string"
    ),
    "smart_key_id": _field(
        "SMART key id (kid)",
        "kid of the signing key in the client's JWKS (default: its RFC 7638 thumbprint)",
        type="string",
    ),
    "smart_private_key_path": _field(
        "SMART private key file",
        "path of the PEM private key (RSA or EC P-384) on the workers; or put the PEM in the password field",
        type="string",
    ),
    "smart_scopes": _field(
        "SMART scopes", "space-separated; default: what leukofhir reads and writes (SMART v2)", type="string"
    ),
    "smart_token_url": _field(
        "SMART token endpoint",
        "default: discovered from [base]/.well-known/smart-configuration",
        type="string",
        format="url",
    ),
}

UI_FIELD_BEHAVIOUR = {
    "hidden-fields": [],
    "relabeling": {
        "host": "Host or FHIR base URL",
        "schema": "Path (e.g. fhir)",
        "login": "User (basic auth)",
        "password": "Password, bearer token, or SMART private key (PEM)",
    },
    "placeholders": {
        "host": "fhir.hospital.example  or  https://fhir.hospital.example/fhir",
        "port": "443",
        "schema": "fhir",
    },
}


def get_provider_info() -> dict:
    return {
        "package-name": "leukofhir",
        "name": "leukofhir",
        "description": "FHIR R4 leukopenia surveillance: a `fhir` connection type for the hospital's FHIR server.",
        "versions": [_version()],
        "connection-types": [
            {
                "connection-type": "fhir",
                "hook-class-name": "leukofhir.airflow.hook.FhirHook",
                "hook-name": "FHIR server",
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
                "conn-fields": CONN_FIELDS,
            },
        ],
    }
