"""Hostile and broken input to the reader and `leukofhir evaluate` (issue 9): no crash, nothing silently lost."""

from __future__ import annotations

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import zlib

import pytest

from leukofhir.cli import main
from leukofhir.errors import UsageError
from leukofhir.extract.reader import ReadError, iter_resources
from support.fhir_builders import at, observation, patient

OUTPUTS = ("Flag.ndjson", "quarantine.ndjson", "report.json", "report.html")


def _read(paths):
    errors: list[ReadError] = []
    items = list(iter_resources(paths, errors.append))
    return items, errors


def _lines(*resources) -> str:
    return "".join(json.dumps(r) + "\n" for r in resources)


def _deep(depth: int, kind: str) -> str:
    opening, closing = ("[", "]") if kind == "arrays" else ('{"a":', "}")
    return '{"resourceType":"Observation","id":"deep","note":' + opening * depth + "1" + closing * depth + "}"


# --- 9.1 a line nested ~1,000 levels deep ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["arrays", "objects"])
@pytest.mark.parametrize("depth", [1000, 150])
def test_a_deeply_nested_line_is_one_read_error_and_reading_goes_on(tmp_path, kind, depth):
    path = tmp_path / "x.ndjson"
    path.write_text(_lines(patient("p1")) + _deep(depth, kind) + "\n" + _lines(patient("p2")))
    items, errors = _read([path])
    assert [i.resource["id"] for i in items] == ["p1", "p2"]
    assert [str(e.source) for e in errors] == [f"{path}:2"]
    assert "nested deeper than 100 levels" in errors[0].message


def test_a_deeply_nested_bundle_entry_or_document_is_a_read_error(tmp_path):
    deep = json.loads(_deep(150, "arrays"))
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": patient("p1")}, {"resource": deep}],
    }
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    (tmp_path / "doc.json").write_text(_deep(1000, "objects"))
    (tmp_path / "doc150.json").write_text(_deep(150, "arrays"))
    items, errors = _read([tmp_path / "bundle.json", tmp_path / "doc.json", tmp_path / "doc150.json"])
    assert [i.resource["id"] for i in items] == ["p1"]
    assert [str(e.source) for e in errors] == [
        f"{tmp_path / 'bundle.json'}#entry[1]",
        str(tmp_path / "doc.json"),
        str(tmp_path / "doc150.json"),
    ]
    assert all("nested deeper than 100 levels" in e.message for e in errors)


def test_evaluate_goes_on_past_a_deeply_nested_line(tmp_path, capsys):
    src = tmp_path / "in.ndjson"
    src.write_text(
        _lines(patient("p1"), observation("w1", "wbc", 1.5, time=at(0)))
        + _deep(1000, "arrays")
        + "\n"
        + _deep(1000, "objects")
        + "\n"
    )
    out = tmp_path / "out"
    assert main(["evaluate", str(src), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["read_total"] == 2 and report["read_errors"] == 2 and report["reconciled"]
    assert report["flags"]["total"] == 1
    quarantine = [json.loads(x) for x in (out / "quarantine.ndjson").read_text().splitlines()]
    assert [q["source"] for q in quarantine] == [f"{src}:3", f"{src}:4"]


def _limited_file_size(limit: int):
    def apply():  # in the child: a write past `limit` bytes fails with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _evaluate_process(args, limit=None):
    return subprocess.run(
        [sys.executable, "-m", "leukofhir.cli", "evaluate", *map(str, args)],
        preexec_fn=_limited_file_size(limit) if limit else None,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """Enough quarantined and flagged input that every output is larger than a few kB."""
    src = tmp_path_factory.mktemp("big") / "in.ndjson"
    resources = [patient(f"p{i}") for i in range(40)]
    resources += [observation(f"w{i}", "wbc", 1.5, time=at(i), patient=f"Patient/p{i}") for i in range(40)]
    resources += [observation(f"u{i}", "wbc", 5, unit="mg", time=at(i)) for i in range(40)]
    src.write_text(_lines(*resources))
    return src


def test_outputs_of_a_failed_run_never_pass_for_a_finished_one(big_input, tmp_path):
    out = tmp_path / "out"
    done = _evaluate_process([big_input, "--out", out])
    assert done.returncode == 0, done.stderr
    assert all((out / name).exists() for name in OUTPUTS)
    # The same run again, but writes past 4 kB fail (EFBIG): the earlier run's outputs must not stay behind
    # looking current, and no half-written file may either.
    failed = _evaluate_process([big_input, "--out", out], limit=4096)
    assert failed.returncode == 5, failed.stderr
    assert "Traceback" not in failed.stderr
    assert sorted(p.name for p in out.iterdir()) == []


# --- 9.4 truncated .gz ---------------------------------------------------------------------------------------------


def test_a_truncated_gz_yields_every_recoverable_line_then_says_where_it_ended(tmp_path):
    lines = [
        json.dumps(observation(f"o{i}", "wbc", 5.0, time=at(i), note=[{"text": f"{i:08d}" * 20}])) + "\n"
        for i in range(20000)
    ]
    whole = gzip.compress("".join(lines).encode(), compresslevel=1)
    cut = whole[: int(len(whole) * 0.6)]
    path = tmp_path / "Observation.ndjson.gz"
    path.write_bytes(cut)
    recoverable = zlib.decompressobj(31).decompress(cut)
    complete = recoverable.count(b"\n")
    assert complete > 10000  # far more than one 1 MB buffer's worth

    items, errors = _read([path])
    assert [i.resource["id"] for i in items] == [f"o{i}" for i in range(complete)]
    assert len(errors) == 1
    assert str(errors[0].source) == f"{path}:{complete + 1}"
    assert "truncated" in errors[0].message and "unreadable" not in errors[0].message
    assert f"after line {complete}" in errors[0].message


def test_a_gz_cut_at_a_line_end_and_corrupt_gz_data_are_reported(tmp_path):
    text = _lines(*[patient(f"p{i}") for i in range(3)]).encode()
    whole = gzip.compress(text)
    compressor = zlib.compressobj(wbits=31)
    flushed = compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH)  # every line out, no trailer
    (tmp_path / "cut.ndjson.gz").write_bytes(flushed)
    corrupt = bytearray(whole)
    corrupt[-6] ^= 0xFF  # the CRC-32 / length trailer no longer matches the data
    (tmp_path / "crc.ndjson.gz").write_bytes(bytes(corrupt))
    (tmp_path / "two.ndjson.gz").write_bytes(gzip.compress(text) + gzip.compress(_lines(patient("q")).encode()))
    items, errors = _read([tmp_path / "cut.ndjson.gz"])
    assert [i.resource["id"] for i in items] == ["p0", "p1", "p2"]
    assert [str(e.source) for e in errors] == [f"{tmp_path / 'cut.ndjson.gz'}:4"]
    assert "truncated" in errors[0].message and "after line 3" in errors[0].message
    items, errors = _read([tmp_path / "crc.ndjson.gz"])
    assert [i.resource["id"] for i in items] == ["p0", "p1", "p2"]
    assert len(errors) == 1 and "corrupt" in errors[0].message
    items, errors = _read([tmp_path / "two.ndjson.gz"])  # concatenated gzip members are one file (RFC 1952 §2.2)
    assert [i.resource["id"] for i in items] == ["p0", "p1", "p2", "q"] and not errors


def test_a_truncated_gz_document_is_one_read_error_that_says_truncated(tmp_path):
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient("p1")}]}
    whole = gzip.compress(json.dumps(bundle).encode())
    (tmp_path / "b.json.gz").write_bytes(whole[:-10])
    items, errors = _read([tmp_path / "b.json.gz"])
    assert items == [] and len(errors) == 1 and "truncated" in errors[0].message


# --- 9.5 an --out that passes the writability check but fails on write -------------------------------------------


def test_an_out_that_fails_on_write_is_a_one_line_error(big_input, tmp_path):
    failed = _evaluate_process([big_input, "--out", tmp_path / "out"], limit=4096)
    assert failed.returncode == 5
    assert "Traceback" not in failed.stderr
    error = [line for line in failed.stderr.splitlines() if "error" in line]
    assert error == [line for line in failed.stderr.splitlines() if line.startswith("leukofhir evaluate: error:")]
    assert len(error) == 1 and "cannot write" in error[0] and "File too large" in error[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="/sys/fs passes os.access(W_OK) only for root")
def test_sys_fs_as_root_is_a_one_line_error(big_input, capsys):
    assert os.access("/sys/fs", os.W_OK)
    assert main(["evaluate", str(big_input), "--out", "/sys/fs"]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leukofhir evaluate: error: cannot write /sys/fs/")


# --- 9.8 inputs that do not exist, suffixes in capitals, skipped files --------------------------------------------


def test_an_input_that_does_not_exist_is_an_error(tmp_path, capsys):
    good = tmp_path / "in.ndjson"
    good.write_text(_lines(patient("p1")))
    out = tmp_path / "out"
    assert main(["evaluate", str(good), str(tmp_path / "nope.ndjson"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"leukofhir evaluate: error: input {tmp_path / 'nope.ndjson'} not found"]
    assert not (out / "report.json").exists()
    with pytest.raises(UsageError, match="not found"):
        list(iter_resources([tmp_path / "nope"]))


def test_load_of_an_input_that_does_not_exist_is_an_error_before_any_request(tmp_path, capsys):
    # Nothing listens on port 9: the error must come before the client ever tries the server.
    assert main(["load", "--fhir-url", "http://127.0.0.1:9/fhir", str(tmp_path / "nope.ndjson")]) == 2
    assert capsys.readouterr().err.strip() == f"leukofhir load: error: input {tmp_path / 'nope.ndjson'} not found"


def test_suffixes_in_capitals_are_read_and_skipped_files_are_said(tmp_path, caplog):
    (tmp_path / "A.NDJSON").write_text(_lines(patient("a1"), patient("a2")))
    (tmp_path / "B.Json").write_text(json.dumps(patient("b")))
    with gzip.open(tmp_path / "C.NDJSON.GZ", "wt") as fh:
        fh.write(_lines(patient("c1"), patient("c2")))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "export.csv").write_text("x")
    out = tmp_path / "out"
    assert main(["evaluate", str(tmp_path), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["read"] == {"Patient": 5} and report["read_errors"] == 0
    assert report["skipped_files"] == [str(tmp_path / "export.csv"), str(tmp_path / "notes.txt")]
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("skipped 2 files" in m and "notes.txt" in m and "export.csv" in m for m in said)


# --- smaller: the column of a truncated line; "starting at at" ----------------------------------------------------


def test_a_truncated_line_names_its_real_column(tmp_path):
    path = tmp_path / "x.ndjson"
    path.write_text(
        '{"resourceType":"Observation","id":"o1","status":\n'
        '{"resourceType": "Patient", "id": "p1", "name": [{"text": "abc\n'
    )
    _, errors = _read([path])
    assert [e.message for e in errors] == [
        "not valid JSON (Expecting value at column 50: the line ends early)",
        "not valid JSON (Unterminated string starting at column 59: the line ends early)",
    ]


def test_only_json_whitespace_makes_a_blank_line(tmp_path):
    path = tmp_path / "x.ndjson"
    path.write_bytes(b" \t\r\n\x0c\n\xc2\xa0\n" + _lines(patient("p1")).encode())
    items, errors = _read([path])
    assert [i.resource["id"] for i in items] == ["p1"]
    assert [e.source.line for e in errors] == [2, 3]  # form feed and no-break space are not JSON whitespace


def test_a_quarantined_resource_whose_file_changed_since_it_was_read_is_still_listed(tmp_path):
    from leukofhir.evaluate.outputs import write_quarantine
    from leukofhir.evaluate.stages import Sources

    path = tmp_path / "in.ndjson"
    path.write_text(_lines(patient("p1"), patient("p2")))
    sources = Sources()
    index = sources.path_index(str(path))
    for line in (1, 2):
        sources.file.append(index), sources.line.append(line), sources.entry.append(-1)
    path.write_text(_lines(patient("p1")))  # line 2 is gone
    write_quarantine(tmp_path / "q.ndjson", [(0, "Patient/p1", ["a"]), (1, "Patient/p2", ["b"])], [], sources)
    path.unlink()  # and now the whole file
    write_quarantine(tmp_path / "q2.ndjson", [(0, "Patient/p1", ["a"])], [], sources)
    first = [json.loads(x) for x in (tmp_path / "q.ndjson").read_text().splitlines()]
    assert first == [
        {"resource": patient("p1"), "reasons": ["a"]},
        {"source": f"{path}:2", "reasons": ["b", "not found again to copy it here"]},
    ]
    second = [json.loads(x) for x in (tmp_path / "q2.ndjson").read_text().splitlines()]
    assert second == [{"source": f"{path}:1", "reasons": ["a", "not found again to copy it here"]}]


def test_a_folder_without_fhir_data_is_said(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "data.ndjson").write_text(_lines(patient("p1")))
    items, errors = _read([empty, tmp_path / "data.ndjson"])
    assert [i.resource["id"] for i in items] == ["p1"] and not errors
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [f"{empty}: no FHIR data files"]
