"""The fedbrats exception hierarchy.

Every error fedbrats raises on purpose derives from :class:`FedbratsError`, so a caller can
catch one type.  Daemons map these to documented exit codes (see ``fedbrats.cli``) and the
aggregator maps them to gRPC status codes (see ``aggregator.server``).
"""

from __future__ import annotations

from dataclasses import dataclass


class FedbratsError(Exception):
    """Base class of every error fedbrats raises deliberately."""

    exit_code = 1


class ConfigError(FedbratsError):
    """A configuration file is invalid.  ``problems`` lists every problem found, at once."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} configuration problem(s):\n{lines}")


@dataclass(frozen=True)
class DataProblem:
    """One input problem found by the preflight: which case, which file, and why."""

    case_id: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"case {self.case_id}: {self.path}: {self.reason}"


class DataError(FedbratsError):
    """Input data is unusable.  ``problems`` lists every problem, each naming case and file."""

    exit_code = 3

    def __init__(self, problems: list[DataProblem] | list[str], header: str = "input data"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header}: {len(self.problems)} problem(s):\n{lines}")


class WireError(FedbratsError):
    """A payload on the wire is malformed: bad chunk order, size or SHA-256 mismatch."""

    exit_code = 4


class ProtocolError(FedbratsError):
    """A request does not fit the protocol state: wrong federation, stale round, wrong stage."""

    exit_code = 5


class RoundAborted(FedbratsError):
    """A round could not complete (too few sites before the deadline); nothing was released."""

    exit_code = 6
