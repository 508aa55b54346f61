"""Typed errors raised by the library; entry points (CLI, Airflow tasks) turn them into exit codes or failures."""

from __future__ import annotations


class LeukofhirError(Exception):
    """Base of every error the project raises on purpose."""


class UsageError(LeukofhirError):
    """Arguments or settings that cannot be used (a one-line message for the user)."""


class ConfigError(LeukofhirError):
    """A rules configuration file that is wrong; the message names the key and why."""


class OutputError(LeukofhirError):
    """An output that could not be written (a full disk, a folder that refuses files); the message names it."""
