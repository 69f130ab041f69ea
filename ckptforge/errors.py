"""The exception hierarchy. Library code raises these; only ``ckptforge.cli`` turns them into
messages and exit codes. No I/O and no printing here."""

from __future__ import annotations


class CkptforgeError(Exception):
    """Base class of every error ckptforge raises on purpose."""


class UsageError(CkptforgeError):
    """Options that contradict each other or the checkpoint (bad usage / bad input)."""


class PlanError(UsageError):
    """Every problem found while validating a plan, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class UnsupportedArchitectureError(UsageError):
    """The checkpoint's architecture has no family adapter."""


class CalibrationError(UsageError):
    """Calibration data missing, empty or of the wrong modality."""


class DiskSpaceError(UsageError):
    """Not enough free disk for the planned output."""


class SourceError(CkptforgeError):
    """A source path or checkpoint file that is missing or unreadable."""


class UnsafeCheckpointError(SourceError):
    """A pickle checkpoint that carries code; it is refused and never executed."""


class HubError(CkptforgeError):
    """The Hugging Face Hub or the network failed (auth, not found, offline, rate limit)."""


class OutputExistsError(CkptforgeError):
    """The output directory exists and ``--force`` was not given."""


class VerificationFailed(CkptforgeError):
    """The converted model differs from the dense model by more than the tolerance."""

    def __init__(self, message: str, report: object | None = None):
        self.report = report
        super().__init__(message)


class TrainingDiverged(VerificationFailed):
    """A training run whose loss became NaN or infinite; it stops before anything is written."""
