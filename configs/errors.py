"""The errors a user can fix: bad records, bad configs, missing models.

Everything else is a bug and propagates as it is. Each message says where (file, line or record, field)
and what to do, so nobody has to read a traceback to find the bad line of a 50k-record file.
"""

from __future__ import annotations


class PomonaError(Exception):
    """Base class for problems the user can fix (input data, configuration, missing files)."""


class ConfigError(PomonaError):
    """A recipe or config value is invalid."""


class ModelLoadError(PomonaError):
    """A model or tokenizer cannot be found or loaded."""


class ScoringError(PomonaError):
    """A model produced a number that must not become a score (NaN, inf, a missing token)."""


class StoreCorrupt(PomonaError):
    """A stage folder's files no longer match what the stage recorded (a shard deleted, truncated or edited)."""


class ComparisonFailed(PomonaError):
    """No method of a comparison finished (the message lists each method's error), or its table cannot be drawn
    as asked; the table itself is written first."""


class RecordError(PomonaError):
    """One input record is unusable. Carries enough to write it to a rejects file."""

    def __init__(self, file: str, location: str, field: str | None, reason: str, raw: object = None):
        self.file = str(file)
        self.location = location
        self.field = field
        self.reason = reason
        self.raw = raw
        where = f"{self.file}, {location}" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {reason}")

    def as_reject(self) -> dict:
        """The row written to a rejects file."""
        return {
            "file": self.file,
            "location": self.location,
            "field": self.field,
            "reason": self.reason,
            "raw": printable(self.raw) if isinstance(self.raw, (dict, list, str)) else repr(self.raw),
        }


def printable(raw: object) -> object:
    """`raw` with each lone UTF-16 surrogate written out as the text \\udXXX: a rejects file is UTF-8, and a row
    rejected for that (or for anything else while holding one) must still be written to it."""
    if isinstance(raw, str):
        return raw.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(raw, dict):
        return {printable(k): printable(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [printable(v) for v in raw]
    return raw
