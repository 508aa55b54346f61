"""Typed errors raised by the library, and the exit code each ends a command with (docs/bad-input.md); entry points
(CLI, Airflow tasks) turn them into exit codes or failures."""

from __future__ import annotations

# Exit codes. 1 is `load`'s "finished, but some input was not loaded".
EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2  # unusable arguments or settings: a missing input, a bad --as-of or rules file, an unusable --out
EXIT_AUTH = 3  # the FHIR server refused our credentials (401) or their rights (403)
EXIT_SERVER = 4  # the FHIR server failed, vanished or answered something unusable
EXIT_OUTPUT = 5  # an output could not be written
EXIT_DATA = 6  # `run`: the run's data failed its contract systemically (rules.yaml `validation`); nothing written
EXIT_INTERRUPTED = 130


class LeukofhirError(Exception):
    """Base of every error the project raises on purpose."""

    # The exit code of a command this error ends; None: that of the error it wraps (its __cause__), else EXIT_USAGE.
    # Each kind names its own, so that this module needs none of the modules that raise them (fhir.errors).
    exit_status: int | None = None


class UsageError(LeukofhirError):
    """Arguments or settings that cannot be used (a one-line message for the user)."""


class ConfigError(LeukofhirError):
    """A rules configuration file that is wrong; the message names the key and why."""


class OutputError(LeukofhirError):
    """An output that could not be written (a full disk, a folder that refuses files); the message names it."""

    exit_status = EXIT_OUTPUT


def exit_code(error: LeukofhirError) -> int:
    """The exit code of a typed error that ended a command."""
    # An error that wraps another (LoadStopped: the FHIR error that stopped the load) exits as the one it wraps.
    while error.exit_status is None and isinstance(error.__cause__, LeukofhirError):
        error = error.__cause__
    return EXIT_USAGE if error.exit_status is None else error.exit_status
