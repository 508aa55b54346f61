"""Read FHIR resources from JSON Bundles, single resources and NDJSON files (plain or .gz), streaming."""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

__all__ = ["Source", "ReadError", "Item", "expand_paths", "iter_resources", "reference_target"]


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


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


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


def _bundle_items(bundle: dict, path: str, on_error: Callable[[ReadError], None]) -> Iterator[Item]:
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
        source = Source(path, entry=index)
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            on_error(ReadError(source, "Bundle entry has no resource with a resourceType"))
            continue
        if full_urls:
            _rewrite_references(res, full_urls)
        if res["resourceType"] == "Bundle":
            yield from _bundle_items(res, path, on_error)
        else:
            yield Item(res, source)


def _raise(error: ReadError) -> None:
    raise ValueError(str(error))


def iter_resources(
    paths: Iterable[str | os.PathLike], on_error: Callable[[ReadError], None] = _raise
) -> Iterator[Item]:
    """Yield every resource in the files (directories expanded), Bundles unpacked, never the whole file in memory
    for NDJSON. Unreadable files, bad JSON lines and non-resources go to `on_error` and reading goes on."""
    for path in expand_paths(paths):
        name = str(path)
        try:
            if _is_ndjson(path):
                with _open_text(path) as fh:
                    for number, line in enumerate(fh, start=1):
                        if not line.strip():
                            continue
                        source = Source(name, line=number)
                        try:
                            res = json.loads(line)
                        except ValueError as exc:
                            on_error(ReadError(source, f"not valid JSON ({exc.msg} at column {exc.colno})"))
                            continue
                        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                            on_error(ReadError(source, "not a FHIR resource (no resourceType)"))
                        elif res["resourceType"] == "Bundle":
                            yield from _bundle_items(res, name, on_error)
                        else:
                            yield Item(res, source)
            else:
                with _open_text(path) as fh:
                    try:
                        res = json.load(fh)
                    except ValueError as exc:
                        on_error(ReadError(Source(name), f"not valid JSON ({exc})"))
                        continue
                if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                    on_error(ReadError(Source(name), "not a FHIR resource (no resourceType)"))
                elif res["resourceType"] == "Bundle":
                    yield from _bundle_items(res, name, on_error)
                else:
                    yield Item(res, Source(name))
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
            on_error(ReadError(Source(name), f"unreadable file ({type(exc).__name__}: {exc})"))
