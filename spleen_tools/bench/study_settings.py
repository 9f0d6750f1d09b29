"""The validity study's knobs and their checks; standard library only, so the CLI stays fast on bad input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA_SETTINGS = ("iid", "noniid", "phase")
# The documented default study; "phase" (sites differ in contrast phase) runs when asked for.
DEFAULT_SETTINGS = ("iid", "noniid")
MAX_SITES = 8
# What the study expects of FedAvg (see spleen_tools.bench.study_report.check_expectations).
CENTRALIZED_TOLERANCE = 0.02


class StudySettingsError(ValueError):
    """Bad input: the CLI prints it as one ``error:`` line and exits 2."""


@dataclass(frozen=True)
class ValiditySettings:
    """Every arm trains ``rounds x local_epochs`` epochs; ``tiny`` shrinks the data for smoke runs."""

    rounds: int = 10
    local_epochs: int = 5
    sites: int = 2
    settings: tuple[str, ...] = DEFAULT_SETTINGS
    seed: int = 0
    tiny: bool = False
    fedavg_timeout: float = 1800.0

    @property
    def epochs(self) -> int:
        return self.rounds * self.local_epochs

    def validate(self) -> None:
        for name, value in (("--rounds", self.rounds), ("--local-epochs", self.local_epochs)):
            if value < 1:
                raise StudySettingsError(f"{name} must be at least 1, got {value}")
        if not 2 <= self.sites <= MAX_SITES:
            raise StudySettingsError(f"--sites must be between 2 and {MAX_SITES}, got {self.sites}")
        if not self.settings:
            raise StudySettingsError(f"--settings needs at least one of {', '.join(DATA_SETTINGS)}")
        unknown = [s for s in self.settings if s not in DATA_SETTINGS]
        if unknown:
            raise StudySettingsError(f"unknown data setting {unknown[0]!r}: expected {', '.join(DATA_SETTINGS)}")
        if len(set(self.settings)) != len(self.settings):
            raise StudySettingsError(f"--settings lists a setting twice: {','.join(self.settings)}")
        if self.seed < 0:
            raise StudySettingsError(f"--seed must be 0 or more, got {self.seed}")


def check_out_dir(out: Path) -> None:
    """An explicit output folder must be new or empty: a study never mixes its files with another's."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StudySettingsError(f"--out {out} exists and is not an empty folder")
