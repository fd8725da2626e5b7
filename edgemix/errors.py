"""User-facing errors. Each carries an exit code and a hint; the CLI prints them without a traceback.

Exit codes (documented in the README):
  0 ok, 1 gate failed, 2 bad usage / config / input, 3 missing toolchain or dependency,
  4 device unreachable.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_TOOLCHAIN = 3
EXIT_DEVICE = 4


class EdgemixError(Exception):
    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}. {self.hint}" if self.hint else self.message


class UsageError(EdgemixError):
    """Bad command-line usage, config, model name, checkpoint or data (exit 2)."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be read or does not fit the model (exit 2)."""


class DataError(UsageError):
    """A data folder or file that cannot be read (exit 2)."""


class ToolchainError(EdgemixError):
    """A missing library, compiler or tool (exit 3)."""

    exit_code = EXIT_TOOLCHAIN


class DeviceError(EdgemixError):
    """A device that cannot be reached (exit 4)."""

    exit_code = EXIT_DEVICE


class GateFailed(EdgemixError):
    exit_code = EXIT_GATE_FAILED


def closest(value: str, choices: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(value.lower(), [c.lower() for c in choices], n=1, cutoff=0.4)
    if not matches:
        return None
    by_lower = {c.lower(): c for c in choices}
    return by_lower[matches[0]]


def unknown_choice(kind: str, value: str, choices: Iterable[str], plural: str | None = None) -> UsageError:
    """The standard 'unknown X' error: names the value, the valid choices and the closest one.
    ``plural`` is the plural of ``kind`` where adding an "s" is wrong ("latency bases",
    "precisions for backend executorch")."""
    choices = sorted(choices)
    near = closest(value, choices)
    hint = f"did you mean '{near}'?" if near else None
    return UsageError(f"unknown {kind} '{value}'; valid {plural or kind + 's'}: {', '.join(choices)}", hint=hint)
