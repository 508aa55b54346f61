"""URL handling: the one redaction, origins, credentials split out of base URLs, Airflow connection parts."""

from __future__ import annotations

import pytest

from leukofhir.errors import UsageError
from leukofhir.fhir.urls import base_url_from_parts, check_base_url, redact_url, same_origin, split_userinfo


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://nurse:pw@fhir.example/fhir", "https://***@fhir.example/fhir"),
        (
            "https://fhir.example/Binary/1?X-Amz-Signature=abc&X-Amz-Credential=k&x=1",
            "https://fhir.example/Binary/1?X-Amz-Signature=***&X-Amz-Credential=***&x=1",
        ),
        (
            "https://h/Observation?code=http://loinc.org|6690-2&subject=Patient/1&access_token=t",
            "https://h/Observation?code=http://loinc.org|6690-2&subject=Patient/1&access_token=***",
        ),
        ("https://h/f?client_secret=s&sig=z&_count=5", "https://h/f?client_secret=***&sig=***&_count=5"),
        ("http://h:99999/f", "http://h:99999/f"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_origins():
    assert same_origin("https://h/fhir", "https://H:443/other")
    assert not same_origin("https://h/fhir", "http://h/fhir")
    assert not same_origin("https://h/fhir", "https://h:8443/fhir")
    assert not same_origin("https://h/fhir", "https://h.evil.example/fhir")


def test_split_userinfo_decodes_and_removes_credentials():
    assert split_userinfo("https://a%40b:p%3Aw@h/fhir") == ("https://h/fhir", "a@b", "p:w")
    assert split_userinfo("https://h/fhir") == ("https://h/fhir", None, None)


@pytest.mark.parametrize(
    "value, message",
    [
        ("ftp://h/fhir", "http"),
        ("h/fhir", "http"),
        ("https://h/fhir?x=1", "query"),
        ("https://u:secret-pw@h/fhir", "LEUKOFHIR_FHIR_PASSWORD"),
        ("https://h:port/fhir", "not a usable URL"),
    ],
)
def test_check_base_url(value, message):
    with pytest.raises(UsageError, match=message) as err:
        check_base_url(value)
    assert "secret-pw" not in str(err.value)


@pytest.mark.parametrize(
    "parts, expected",
    [
        (("fhir.example", None, None, None), "https://fhir.example"),
        (("fhir.example", 8443, "r4/fhir", None), "https://fhir.example:8443/r4/fhir"),
        (("fhir.example", None, "/fhir/", "http"), "http://fhir.example/fhir"),
        (("fhir.example/fhir", None, None, None), "https://fhir.example/fhir"),
        (("http://127.0.0.1:8080/fhir", None, None, None), "http://127.0.0.1:8080/fhir"),
        (("http://127.0.0.1/fhir", 8080, "fhir", None), "http://127.0.0.1:8080/fhir"),
        (("http://127.0.0.1:8080/fhir", 9999, None, None), "http://127.0.0.1:8080/fhir"),
    ],
)
def test_base_url_from_connection_parts(parts, expected):
    assert base_url_from_parts(*parts) == expected


@pytest.mark.parametrize(
    "parts, message",
    [
        ((None, None, None, None), "no host"),
        (("h", None, None, "ftp"), "not http"),
        (("http://h/fhir", None, None, "https"), "extra says"),
        (("h/a", None, "b", None), "two paths"),
    ],
)
def test_base_url_from_bad_connection_parts(parts, message):
    with pytest.raises(UsageError, match=message):
        base_url_from_parts(*parts)
