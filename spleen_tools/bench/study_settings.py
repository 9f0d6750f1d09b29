"""The validity study's knobs and their checks; light imports only, so the CLI stays fast on bad input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spleen_tools.algorithms import DEFAULT_ALGORITHM, algorithm_names

DATA_SETTINGS = ("iid", "noniid", "phase")
# The documented default study; "phase" (sites differ in contrast phase) runs when asked for.
DEFAULT_SETTINGS = ("iid", "noniid")
DEFAULT_METHODS = (DEFAULT_ALGORITHM,)
DEFAULT_SEEDS = (0,)
MAX_SITES = 8
# What the study expects of an FL method (see spleen_tools.bench.study_checks.check_expectations).
CENTRALIZED_TOLERANCE = 0.02


class StudySettingsError(ValueError):
    """Bad input: the CLI prints it as one ``error:`` line and exits 2."""


@dataclass(frozen=True)
class ValiditySettings:
    """Every arm trains ``rounds x local_epochs`` epochs; the FL arm once per method of ``methods`` (names of
    jobs/algorithms); everything once per data seed of ``seeds``; ``tiny`` shrinks the data for smoke runs."""

    rounds: int = 10
    local_epochs: int = 5
    sites: int = 2
    settings: tuple[str, ...] = DEFAULT_SETTINGS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    methods: tuple[str, ...] = DEFAULT_METHODS
    tiny: bool = False
    fl_timeout: float = 1800.0

    @property
    def epochs(self) -> int:
        return self.rounds * self.local_epochs

    def validate(self) -> None:
        for name, value in (("--rounds", self.rounds), ("--local-epochs", self.local_epochs)):
            if value < 1:
                raise StudySettingsError(f"{name} must be at least 1, got {value}")
        if not 2 <= self.sites <= MAX_SITES:
            raise StudySettingsError(f"--sites must be between 2 and {MAX_SITES}, got {self.sites}")
        _check_names("--settings", "data setting", self.settings, DATA_SETTINGS)
        _check_names("--methods", "method", self.methods, tuple(algorithm_names()))
        if not self.seeds:
            raise StudySettingsError("--seeds needs at least one seed")
        negative = [s for s in self.seeds if s < 0]
        if negative:
            raise StudySettingsError(f"a seed must be 0 or more, got {negative[0]}")
        if len(set(self.seeds)) != len(self.seeds):
            raise StudySettingsError(f"--seeds lists a seed twice: {','.join(map(str, self.seeds))}")


def _check_names(flag: str, what: str, given: tuple[str, ...], known: tuple[str, ...]) -> None:
    """Non-empty, each one known, none twice."""
    if not given:
        raise StudySettingsError(f"{flag} needs at least one of {', '.join(known)}")
    unknown = [name for name in given if name not in known]
    if unknown:
        raise StudySettingsError(f"unknown {what} {unknown[0]!r}: expected {', '.join(known)}")
    if len(set(given)) != len(given):
        raise StudySettingsError(f"{flag} lists a {what} twice: {','.join(given)}")


def check_out_dir(out: Path) -> None:
    """An explicit output folder must be new or empty: a study never mixes its files with another's."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StudySettingsError(f"--out {out} exists and is not an empty folder")
