"""Transactions that isolate what the server refuses: one all-or-nothing Bundle, and when it is refused, its halves
until each refused entry stands alone, so that everything else is written. Used by `load` and by the Flag writes."""

from __future__ import annotations

import logging
from typing import Callable

from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import AuthError, FatalFhirError, FhirError

log = logging.getLogger(__name__)

# Credentials or their rights refused: every other entry would be refused the same way, so the caller stops.
AUTH_REFUSALS = frozenset({401, 403})


class IncompleteAnswerError(FhirError):
    """A transaction answered without a response for every entry sent (FHIR R4 §3.1.0.11.2: one per entry)."""


def answers(entries: list[dict], response) -> list:
    """The transaction-response's entries, one per entry sent; IncompleteAnswerError when they do not add up."""
    got = response.get("entry") if isinstance(response, dict) else None
    if not isinstance(got, list) or len(got) != len(entries):
        count = len(got) if isinstance(got, list) else 0
        raise IncompleteAnswerError(
            f"the server answered {count} of the {len(entries)} entries sent (a transaction-response answers "
            "every entry)"
        )
    return got


class TransactionWriter:
    """Sends transaction Bundles; `written(entries, answers)` hears each one the server accepted, `refused(entry,
    error)` each entry refused on its own. The one rule for what stops: credentials or rights refused (AuthError,
    401/403) at once, as does any error that is no refusal of the data (the server gone, an incomplete answer) and
    any status in `stops` (the caller's refusals of the request itself); every other FatalFhirError is a refusal of
    the data, isolated by halving. `second_round`: the entries refused alone are sent once more at the end (an entry
    may have referred to one written later in its transaction). Nothing is retried here: the client's retry policy
    (leukofhir.fhir.http) is the only one."""

    def __init__(
        self,
        client: FhirClient,
        written: Callable[[list[dict], list], None],
        refused: Callable[[dict, FatalFhirError], None],
        *,
        stops: frozenset[int] = frozenset(),
        second_round: bool = False,
    ):
        self.client = client
        self.written = written
        self.refused = refused
        self.stops = stops
        self.second_round = second_round

    def send(self, entries: list[dict]) -> None:
        """One transaction; when the server refuses it, the refused entries isolated and the rest written."""
        if not self.settle(entries, lambda: self.client.transaction(entries)):
            self.isolate(entries)

    def settle(self, entries: list[dict], answer: Callable[[], dict]) -> bool:
        """Record a transaction's answer (`answer()` returns it or raises): True when that settles it (written, or
        its one entry refused), False when the server refused a transaction of several entries (to be isolated)."""
        alone = self._settle(entries, answer)
        if alone is None:
            return True
        if len(entries) == 1:
            self.refused(entries[0], alone)
            return True
        log.info("transaction of %d refused (HTTP %s); isolating the refused entries", len(entries), alone.status)
        return False

    def isolate(self, entries: list[dict]) -> None:
        """The entries of a refused transaction, halved until each refused one stands alone."""
        alone: list[tuple[dict, FatalFhirError]] = []
        middle = len(entries) // 2  # the whole was refused already: its halves go next
        for half in (entries[:middle], entries[middle:]):
            if half:
                self._halve(half, alone)
        if self.second_round and alone:
            again, alone = alone, []
            for entry, _ in again:
                self._halve([entry], alone)
        for entry, error in alone:
            self.refused(entry, error)

    def _halve(self, entries: list[dict], alone: list[tuple[dict, FatalFhirError]]) -> None:
        error = self._settle(entries, lambda: self.client.transaction(entries))
        if error is None:
            return
        if len(entries) == 1:
            alone.append((entries[0], error))
            return
        middle = len(entries) // 2
        self._halve(entries[:middle], alone)
        self._halve(entries[middle:], alone)

    def _settle(self, entries: list[dict], answer: Callable[[], dict]) -> FatalFhirError | None:
        """None when the transaction was written (and recorded), else the refusal of its data."""
        try:
            response = answer()
        except FatalFhirError as exc:
            if isinstance(exc, AuthError) or exc.status in AUTH_REFUSALS or exc.status in self.stops:
                raise
            return exc
        self.written(entries, answers(entries, response))
        return None
