"""Read FHIR resources from JSON Bundles, single resources and NDJSON files (plain or .gz), streaming."""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import msgspec

__all__ = ["Source", "ReadError", "Item", "expand_paths", "iter_resources", "iter_located", "reference_target"]


@dataclass(frozen=True, slots=True)
class Source:
    """Where a resource was read: a file and a 1-based NDJSON line, or a Bundle entry index."""

    path: str
    line: int | None = None
    entry: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.entry is not None:
            return f"{self.path}#entry[{self.entry}]"
        return self.path


@dataclass(frozen=True, slots=True)
class ReadError:
    """Something in a file that could not be read as a FHIR resource; never patient data, only where and why."""

    source: Source
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass(frozen=True, slots=True)
class Item:
    """One resource as read, and where it came from."""

    resource: dict
    source: Source


_DATA_SUFFIXES = (".json", ".ndjson", ".jsonl", ".json.gz", ".ndjson.gz", ".jsonl.gz")


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and the FHIR data files inside any directory given (sorted, recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(_DATA_SUFFIXES)))
        else:
            out.append(p)
    return out


_BUFFER = 1 << 20
# msgspec parses JSON into plain dicts and lists about twice as fast as json.loads (the reader's hot path). What it
# rejects goes through json.loads as well, so exactly the same lines are accepted as before (json.loads also takes
# NaN, Infinity and lone surrogates) and a bad line is reported with json's own message and column.
_decode = msgspec.json.Decoder().decode


def _open_binary(path: Path):
    """NDJSON lines are split on b"\n" only (not on U+2028, U+0085 or a lone CR) and decoded as UTF-8 per line."""
    if path.name.endswith(".gz"):
        # A buffered reader over the gzip stream: lines are split in C, not by GzipFile.readline.
        return io.BufferedReader(gzip.open(path, "rb"), buffer_size=_BUFFER)
    return open(path, "rb", buffering=_BUFFER)


class _BadLine(Exception):
    """A line that is not JSON; the message says why (and where in the line), never what it holds."""


_BLANK = object()


def _decode_slow(line: bytes):
    """The resource on a line msgspec rejected: json.loads decides, as it always did. _BLANK for a blank line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadLine(f"not valid UTF-8 (byte {exc.start + 1})") from None
    if not text.strip():
        return _BLANK
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})") from None


def _decode_document(data: bytes):
    """A whole JSON file (a Bundle or one resource)."""
    try:
        return _decode(data)
    except ValueError:
        return json.loads(data.decode("utf-8"))  # UnicodeDecodeError: the file is unreadable, as before


def _is_ndjson(path: Path) -> bool:
    name = path.name.removesuffix(".gz")
    return name.endswith((".ndjson", ".jsonl"))


def reference_target(reference: str | None) -> tuple[str | None, str | None]:
    """Split a reference into (type, id): `Patient/1`, `http://x/fhir/Patient/1/_history/2` or `urn:uuid:x`.

    A `urn:uuid:` reference names no type (Synthea NDJSON uses them with the target's id), so type is None.
    """
    if not reference or not isinstance(reference, str):
        return None, None
    if reference.startswith("urn:uuid:") or reference.startswith("urn:oid:"):
        return None, reference.split(":", 2)[2]
    if reference.startswith("#"):
        return None, reference
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2], parts[-1]
    return None, parts[-1]


def _rewrite_references(node, full_urls: dict[str, str]) -> None:
    """Replace references to a Bundle entry's fullUrl with `Type/id` in place (FHIR R4 §2.36.4.1)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                target = full_urls.get(value)
                if target is not None:
                    node[key] = target
            elif isinstance(value, (dict, list)):
                _rewrite_references(value, full_urls)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, (dict, list)):
                _rewrite_references(value, full_urls)


def _bundle_items(bundle: dict, path: str, on_error: Callable[[ReadError], None]) -> Iterator[tuple]:
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        on_error(ReadError(Source(path), "Bundle.entry is not a list"))
        return
    full_urls: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        res = entry.get("resource")
        url = entry.get("fullUrl")
        if isinstance(res, dict) and isinstance(url, str) and res.get("resourceType") and res.get("id"):
            full_urls[url] = f"{res['resourceType']}/{res['id']}"
    for index, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            on_error(ReadError(Source(path, entry=index), "Bundle entry has no resource with a resourceType"))
            continue
        if full_urls:
            _rewrite_references(res, full_urls)
        if res["resourceType"] == "Bundle":
            yield from _bundle_items(res, path, on_error)
        else:
            yield res, path, None, index


def _raise(error: ReadError) -> None:
    raise ValueError(str(error))


def iter_resources(
    paths: Iterable[str | os.PathLike], on_error: Callable[[ReadError], None] = _raise
) -> Iterator[Item]:
    """Yield every resource in the files (directories expanded), Bundles unpacked, never the whole file in memory
    for NDJSON. Unreadable files, bad JSON lines and non-resources go to `on_error` and reading goes on."""
    for resource, path, line, entry in iter_located(paths, on_error):
        yield Item(resource, Source(path, line, entry))


def iter_located(
    paths: Iterable[str | os.PathLike], on_error: Callable[[ReadError], None] = _raise
) -> Iterator[tuple[dict, str, int | None, int | None]]:
    """`iter_resources` without an Item per resource: (resource, path, NDJSON line, Bundle entry) tuples, the path
    being one str object per file. The pipeline's hot path; same resources, same errors."""
    for path in expand_paths(paths):
        name = str(path)
        try:
            if _is_ndjson(path):
                with _open_binary(path) as fh:
                    for number, line in enumerate(fh, start=1):
                        try:
                            res = _decode(line)
                        except ValueError:
                            try:
                                res = _decode_slow(line)
                            except _BadLine as exc:
                                on_error(ReadError(Source(name, line=number), str(exc)))
                                continue
                            if res is _BLANK:
                                continue
                        kind = res.get("resourceType") if type(res) is dict else None
                        if type(kind) is not str:
                            on_error(ReadError(Source(name, line=number), "not a FHIR resource (no resourceType)"))
                        elif kind == "Bundle":
                            yield from _bundle_items(res, name, on_error)
                        else:
                            yield res, name, number, None
            else:
                with _open_binary(path) as fh:
                    data = fh.read()
                try:
                    res = _decode_document(data)
                except UnicodeDecodeError:
                    raise
                except ValueError as exc:
                    on_error(ReadError(Source(name), f"not valid JSON ({exc})"))
                    continue
                if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                    on_error(ReadError(Source(name), "not a FHIR resource (no resourceType)"))
                elif res["resourceType"] == "Bundle":
                    yield from _bundle_items(res, name, on_error)
                else:
                    yield res, name, None, None
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
            on_error(ReadError(Source(name), f"unreadable file ({type(exc).__name__}: {exc})"))
