"""Secrets as they are read (the environment, `*_FILE` files, connections): stripped and checked where they are read,
so no message or traceback ever shows one. Below both auth strategies (auth.py, smart.py), which read them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from leukofhir.errors import UsageError

# RFC 6750 §2.1 b64token: what may follow "Bearer " in a header.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean_secret(value: str, where: str, *, multiline: bool = False) -> str:
    """`value` without surrounding whitespace (a mounted secret file usually ends with a newline), refused when
    empty or when a line break or control character sits inside it. `where` names the source in messages; the
    value itself never appears."""
    value = value.strip()
    if not value:
        raise UsageError(f"{where} is empty")
    if not multiline and _CONTROL.search(value):
        raise UsageError(f"{where} holds a line break or another control character inside the value")
    return value


def check_token(value: str, where: str) -> str:
    """A bearer token fit for an Authorization header (a bad one would make requests raise an error quoting it)."""
    value = clean_secret(value, where)
    if not _B64TOKEN.fullmatch(value):
        raise UsageError(
            f"{where} is not a usable bearer token (RFC 6750: letters, digits and -._~+/ then =; no spaces)"
        )
    return value


def secret(name: str, environ=os.environ, *, check: Callable[[str, str], str] = clean_secret) -> str | None:
    """The value of `name`, or the contents of the file named by `name_FILE` (Docker/K8s secret style), passed
    through `check(value, where)`; None when neither is set."""
    value = environ.get(name)
    if value is not None and value != "":
        return check(value, name)
    path = environ.get(f"{name}_FILE")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8"
            raise UsageError(f"cannot read {name}_FILE ({path}): {why}") from None
        return check(text, f"{name}_FILE ({path})")
    return None


def pem(value: str, where: str) -> str:
    """A PEM key as read: stripped, its line breaks kept."""
    return clean_secret(value, where, multiline=True)
