"""Read FHIR resources from JSON Bundles, single resources and NDJSON files (plain or .gz), streaming."""

from __future__ import annotations

import io
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import msgspec

from leukofhir.errors import UsageError

__all__ = [
    "Source",
    "ReadError",
    "Item",
    "expand_paths",
    "iter_resources",
    "iter_located",
    "decode_line",
]


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


log = logging.getLogger(__name__)

_DATA_SUFFIXES = (".json", ".ndjson", ".jsonl", ".json.gz", ".ndjson.gz", ".jsonl.gz")
SHOWN_SKIPPED_FILES = 10
# Deeper than this is no plausible FHIR resource (a Questionnaire's nested items stay far below it), and the JSON
# decoders and every recursive walk after them would fail on it with a RecursionError: such a line is a read error.
MAX_DEPTH = 100
TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels (not a plausible FHIR resource)"


def _is_data_file(path: Path) -> bool:
    return path.name.lower().endswith(_DATA_SUFFIXES)  # export tools write *.NDJSON as often as *.ndjson


def expand_paths(paths: Iterable[str | os.PathLike], skipped: list[str] | None = None) -> list[Path]:
    """Files as given, and the FHIR data files inside any directory given (sorted, recursive).

    A path that does not exist is a UsageError (a typo must not pass for an empty input). Files in a directory that
    are not FHIR data (by suffix, any case) are skipped with a warning, and appended to `skipped` when given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            out.extend(f for f in files if _is_data_file(f))
            others = [str(f) for f in files if not _is_data_file(f)]
            if others:
                names = ", ".join(str(Path(f).relative_to(p)) for f in others[:SHOWN_SKIPPED_FILES])
                more = f" and {len(others) - SHOWN_SKIPPED_FILES} more" if len(others) > SHOWN_SKIPPED_FILES else ""
                log.warning(
                    "%s: skipped %d files that are not FHIR data (.json, .ndjson or .jsonl, plain or .gz): %s%s",
                    p,
                    len(others),
                    names,
                    more,
                )
                if skipped is not None:
                    skipped.extend(others)
            elif not files:
                log.warning("%s: no FHIR data files", p)
        elif p.exists() or p.is_symlink():
            out.append(p)  # a dangling link or an unreadable file is a read error of its own, reported when read
        else:
            raise UsageError(f"input {p} not found")
    return out


_BUFFER = 1 << 20
# msgspec parses JSON into plain dicts and lists about twice as fast as json.loads (the reader's hot path). What it
# rejects goes through json.loads as well, so exactly the same lines are accepted as before (json.loads also takes
# NaN, Infinity and lone surrogates) and a bad line is reported with json's own message and column.
_decode = msgspec.json.Decoder().decode
# What msgspec raises for a line it rejects: its DecodeError is a ValueError only from msgspec 0.21 on, and an Airflow
# 3.2 environment may hold an older one (Airflow asks for msgspec>=0.19).
_REJECTED = (ValueError, msgspec.DecodeError)


class _Gunzip(io.RawIOBase):
    """The decompressed bytes of a .gz file, member after member (RFC 1952 §2.2), as a raw stream.

    Unlike gzip.GzipFile, which raises and drops what it had decompressed of its last buffer, a stream that ends
    early or turns corrupt simply ends here, after every byte that could be recovered; `problem` says why."""

    _CHUNK = 1 << 16  # compressed bytes read at a time
    _MAX_OUT = 1 << 22  # decompressed bytes produced at a time: a "zip bomb" line never sits in memory whole

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self._inflate = zlib.decompressobj(31)  # 31: gzip header and trailer; zlib checks the CRC-32 and length
        self._input = b""
        self._pending = memoryview(b"")
        self._fed = False
        self._produced = 0
        self.problem: str | None = None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._file.close()
        super().close()

    def readinto(self, buffer) -> int:
        if not self._pending:
            self._pending = memoryview(self._more())
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _more(self) -> bytes:
        """The next decompressed bytes; b"" at the end of the data, clean or not (then `problem` is set)."""
        while self.problem is None:
            inflate = self._inflate
            if inflate.eof:
                # Another member may follow; gzip (the tool) also accepts zero bytes of padding after the last one.
                rest = inflate.unused_data.lstrip(b"\0")
                while not rest:
                    chunk = self._file.read(self._CHUNK)
                    if not chunk:
                        return b""
                    rest = chunk.lstrip(b"\0")
                self._inflate, self._input = zlib.decompressobj(31), rest
                continue
            data = self._input or self._file.read(self._CHUNK)
            if not data:
                try:
                    tail = inflate.flush()
                except zlib.error as exc:
                    tail, self.problem = b"", f"corrupt .gz data ({exc})"
                if self._fed and not inflate.eof and self.problem is None:
                    self.problem = "truncated .gz (the compressed data ends early)"
                return tail
            self._fed = True
            before = inflate.copy()
            try:
                out = inflate.decompress(data, self._MAX_OUT)
            except zlib.error as exc:
                out = _salvage(before, data)
                self._produced += len(out)
                self.problem = f"corrupt .gz data ({exc})" if self._produced else f"not gzip data ({exc})"
                return out
            self._input = inflate.unconsumed_tail
            if out:
                self._produced += len(out)
                return out
        return b""


def _salvage(inflate, data: bytes) -> bytes:
    """What a decompressor yields of `data` before the byte where it fails (zlib drops the output of a failing
    call, so the failing stretch is fed again a byte at a time)."""
    out = bytearray()
    view = memoryview(data)
    start, step = 0, 4096
    while start < len(view):
        before = inflate.copy()
        try:
            out += inflate.decompress(view[start : start + step])
        except zlib.error:
            if step == 1:
                break
            inflate, step = before, 1
            continue
        start += step
    return bytes(out)


def _open_binary(path: Path):
    """NDJSON lines are split on b"\n" only (not on U+2028, U+0085 or a lone CR) and decoded as UTF-8 per line."""
    if path.name.lower().endswith(".gz"):
        # A buffered reader over the decompressed stream: lines are split in C.
        return io.BufferedReader(_Gunzip(path), buffer_size=_BUFFER)
    return open(path, "rb", buffering=_BUFFER)


def _gzip_problem(fh) -> str | None:
    raw = getattr(fh, "raw", None)
    return raw.problem if isinstance(raw, _Gunzip) else None


def _deeper_than(value, limit: int) -> bool:
    """Whether decoded JSON nests dicts and lists more than `limit` deep; iterative, so any depth is safe."""
    stack = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > limit:
            return True
        for child in node.values() if type(node) is dict else node:
            kind = type(child)
            if kind is dict or kind is list:
                push((child, depth + 1))
    return False


_NOT_OPENERS = bytes(b for b in range(256) if b not in b"{[")


def _may_be_too_deep(data: bytes) -> bool:
    """A cheap bound (one C pass, about 2 % of an `evaluate` run): JSON nested deeper than MAX_DEPTH has more than
    MAX_DEPTH opening brackets. Only lines that have that many are walked."""
    return len(data.translate(None, _NOT_OPENERS)) > MAX_DEPTH


class _BadLine(Exception):
    """A line that is not JSON; the message says why (and where in the line), never what it holds."""


_BLANK = object()


_JSON_WHITESPACE = b" \t\r\n"  # RFC 8259 §2; a line of other "spaces" (form feed, U+00A0) is not blank


def _decode_slow(line: bytes):
    """The resource on a line msgspec rejected: json.loads decides, as it always did. _BLANK for a blank line."""
    content = line.rstrip(b"\r\n")  # the column of an error is counted in this line, never past its end
    if not content.strip(_JSON_WHITESPACE):
        return _BLANK
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadLine(f"not valid UTF-8 (byte {exc.start + 1})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise _BadLine(TOO_DEEP) from None
    except ValueError as exc:
        # json's messages end in "at" where they name a start ("Unterminated string starting at").
        where = "column" if exc.msg.endswith(" at") else "at column"
        cut = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        ends = ": the line ends early" if cut else ""
        raise _BadLine(f"not valid JSON ({exc.msg} {where} {exc.colno}{ends})") from None


def _decode_document(data: bytes):
    """A whole JSON file (a Bundle or one resource)."""
    try:
        return _decode(data)
    except _REJECTED:
        return json.loads(data.decode("utf-8"))  # UnicodeDecodeError: the file is unreadable, as before


def decode_line(line: bytes):
    """One NDJSON line the reader has accepted before, decoded as the reader decodes it (msgspec, else json.loads)."""
    try:
        return _decode(line)
    except (*_REJECTED, RecursionError):
        return json.loads(line)


def _is_ndjson(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith((".ndjson", ".jsonl"))


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


def _bundle_items(bundle: dict, path: str, on_error: Callable[[ReadError], None], check_depth: bool) -> Iterator[tuple]:
    """The resources of a Bundle (nested Bundles unpacked). `check_depth`: the Bundle may hold entries nested too
    deep (it was not ruled out as a whole), so each entry is checked."""
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
        if check_depth and _deeper_than(res, MAX_DEPTH):
            on_error(ReadError(Source(path, entry=index), TOO_DEEP))
            continue
        if full_urls:
            _rewrite_references(res, full_urls)
        if res["resourceType"] == "Bundle":
            yield from _bundle_items(res, path, on_error, check_depth)
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
    paths: Iterable[str | os.PathLike], on_error: Callable[[ReadError], None] = _raise, *, raw: bool = False
) -> Iterator[tuple]:
    """`iter_resources` without an Item per resource: (resource, path, NDJSON line, Bundle entry) tuples, the path
    being one str object per file. The pipeline's hot path; same resources, same errors.

    `raw`: each tuple also holds the NDJSON line's bytes as read (None for a resource of a JSON file or Bundle), so a
    caller copying resources elsewhere (evaluate's partitions) writes them without encoding them again."""
    for path in expand_paths(paths):
        name = str(path)
        try:
            if _is_ndjson(path):
                yield from _ndjson_located(path, name, on_error, raw)
            else:
                with _open_binary(path) as fh:
                    data = fh.read()
                    problem = _gzip_problem(fh)
                if problem:
                    on_error(ReadError(Source(name), f"unreadable file ({problem})"))
                    continue
                try:
                    res = _decode_document(data)
                except UnicodeDecodeError:
                    raise
                except RecursionError:
                    on_error(ReadError(Source(name), TOO_DEEP))
                    continue
                except ValueError as exc:
                    on_error(ReadError(Source(name), f"not valid JSON ({exc})"))
                    continue
                deep = _may_be_too_deep(data) and _deeper_than(res, MAX_DEPTH)
                if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                    on_error(ReadError(Source(name), "not a FHIR resource (no resourceType)"))
                elif res["resourceType"] == "Bundle":
                    items = _bundle_items(res, name, on_error, deep)
                    yield from ((*item, None) for item in items) if raw else items
                elif deep:
                    on_error(ReadError(Source(name), TOO_DEEP))
                else:
                    yield (res, name, None, None, None) if raw else (res, name, None, None)
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            on_error(ReadError(Source(name), f"unreadable file ({type(exc).__name__}: {exc})"))


def _ndjson_located(path: Path, name: str, on_error: Callable[[ReadError], None], raw: bool = False) -> Iterator[tuple]:
    """The resources of an NDJSON file (plain or .gz), line by line; a truncated or corrupt .gz gives every line
    before the damage, then one read error saying where it ended."""
    number = 0
    with _open_binary(path) as fh:
        for number, line in enumerate(fh, start=1):
            try:
                res = _decode(line)
            except (*_REJECTED, RecursionError) as exc:
                try:
                    if isinstance(exc, RecursionError):
                        raise _BadLine(TOO_DEEP) from None
                    res = _decode_slow(line)
                except _BadLine as bad:
                    if line[-1:] != b"\n" and _gzip_problem(fh):
                        # The damage cut this line short: the one error of the file says so and where.
                        on_error(
                            ReadError(
                                Source(name, line=number),
                                f"{_gzip_problem(fh)}: the file ends in the "
                                f"middle of this line, after line {number - 1}",
                            )
                        )
                        return
                    on_error(ReadError(Source(name, line=number), str(bad)))
                    continue
                if res is _BLANK:
                    continue
            if _may_be_too_deep(line) and _deeper_than(res, MAX_DEPTH):
                on_error(ReadError(Source(name, line=number), TOO_DEEP))
                continue
            kind = res.get("resourceType") if type(res) is dict else None
            if type(kind) is not str:
                on_error(ReadError(Source(name, line=number), "not a FHIR resource (no resourceType)"))
            elif kind == "Bundle":
                items = _bundle_items(res, name, on_error, False)
                yield from ((*item, None) for item in items) if raw else items
            elif raw:
                yield res, name, number, None, line
            else:
                yield res, name, number, None
        problem = _gzip_problem(fh)
    if problem and number:
        on_error(ReadError(Source(name, line=number + 1), f"{problem}, after line {number}"))
    elif problem:
        on_error(ReadError(Source(name), f"unreadable file ({problem})"))
