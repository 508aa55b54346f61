"""Reading FHIR files: Bundles, NDJSON, .gz, fullUrl references, and errors that name file and line."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import EXTERNAL

from leukofhir.extract.reader import ReadError, Source, iter_resources
from leukofhir.fhir.references import reference_target


def _read(paths):
    errors: list[ReadError] = []
    items = list(iter_resources(paths, errors.append))
    return items, errors


def test_hl7_transaction_bundle_is_unpacked_with_fullurl_references_rewritten():
    items, errors = _read([EXTERNAL / "hl7-fhir-r4-examples" / "Bundle-ghp.json"])
    assert not errors and items
    assert all(i.source.entry is not None for i in items)
    refs = [i.resource["subject"]["reference"] for i in items if "subject" in i.resource]
    assert refs and not any(r.startswith("urn:uuid:") for r in refs)


def test_synthea_bundle_gz_references_become_type_slash_id():
    path = sorted((EXTERNAL / "smart-generated-sample-data-R4-synthea" / "bundles").glob("*.gz"))[0]
    items, errors = _read([path])
    assert not errors
    patient = next(i.resource for i in items if i.resource["resourceType"] == "Patient")
    obs = [i.resource for i in items if i.resource["resourceType"] == "Observation"]
    assert {o["subject"]["reference"] for o in obs} == {f"Patient/{patient['id']}"}


def test_ndjson_bad_lines_are_reported_with_file_and_line_and_reading_goes_on(tmp_path):
    path = tmp_path / "x.ndjson"
    path.write_text('{"resourceType":"Patient","id":"a"}\n\n{not json\n[1,2]\n{"resourceType":"Patient","id":"b"}\n')
    items, errors = _read([path])
    assert [i.resource["id"] for i in items] == ["a", "b"]
    assert [i.source.line for i in items] == [1, 5]
    assert [str(e.source) for e in errors] == [f"{path}:3", f"{path}:4"]
    assert "not valid JSON" in errors[0].message and "no resourceType" in errors[1].message


def test_gzip_ndjson_and_directories_and_unreadable_files(tmp_path):
    with gzip.open(tmp_path / "a.ndjson.gz", "wt") as fh:
        fh.write(json.dumps({"resourceType": "Observation", "id": "o1"}) + "\n")
    (tmp_path / "b.json.gz").write_bytes(b"not gzip at all")
    (tmp_path / "ignored.txt").write_text("x")
    (tmp_path / "link.json").symlink_to(tmp_path / "gone.json")
    items, errors = _read([tmp_path, tmp_path / "link.json"])
    assert [i.resource["id"] for i in items] == ["o1"]
    assert {e.source.path.rsplit("/", 1)[1] for e in errors} == {"b.json.gz", "link.json"}
    assert all("unreadable file" in e.message for e in errors)


def test_default_error_handler_raises_with_location(tmp_path):
    path = tmp_path / "x.ndjson"
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"x\.ndjson:1"):
        list(iter_resources([path]))


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("Patient/123", ("Patient", "123")),
        ("http://h/fhir/Patient/9/_history/2", ("Patient", "9")),
        ("urn:uuid:abc-1", (None, "abc-1")),
        ("#med1", (None, "#med1")),
        ("", (None, None)),
        (None, (None, None)),
    ],
)
def test_reference_target(reference, expected):
    assert reference_target(reference) == expected


def test_source_strings():
    assert str(Source("f.ndjson", line=3)) == "f.ndjson:3"
    assert str(Source("b.json", entry=0)) == "b.json#entry[0]"


def test_ndjson_lines_split_at_newline_only_and_bad_utf8_is_one_bad_line(tmp_path):
    path = tmp_path / "x.ndjson"
    odd = "a\u2028b\u0085c\u000bd"
    with open(path, "wb") as fh:
        fh.write(
            (
                json.dumps({"resourceType": "Patient", "id": "a", "name": [{"text": odd}]}, ensure_ascii=False) + "\n"
            ).encode("utf-8")
        )
        fh.write(b'{"resourceType":"Patient","id":"\xff"}\n')
        fh.write(b'{"resourceType":"Observation","id":"o","valueQuantity":{"value":Infinity}}\r\n')
        fh.write(b"   \n")
    items, errors = _read([path])
    assert [(i.resource["id"], i.source.line) for i in items] == [("a", 1), ("o", 3)]
    assert items[0].resource["name"][0]["text"] == odd
    assert items[1].resource["valueQuantity"]["value"] == float("inf")  # json.loads accepts it, as before
    assert [str(e.source) for e in errors] == [f"{path}:2"] and "not valid UTF-8" in errors[0].message


def test_a_bad_line_names_json_column(tmp_path):
    path = tmp_path / "x.ndjson"
    path.write_text('{"resourceType": "Patient", "id": }\n')
    _, errors = _read([path])
    assert errors[0].message == "not valid JSON (Expecting value at column 35)"
