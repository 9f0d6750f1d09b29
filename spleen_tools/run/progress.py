"""Following a run: the tagged lines the sites and the server write into their logs, and what they add up to.

Sites write ``[spleen]`` progress lines and NVFlare components ``[spleen-he]`` lines in the format of
``spleen_flare.contract``; the server's own ``Round N started/finished`` lines give its round times.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from spleen_flare.contract import HE_TAG, KEY_METRIC, PROGRESS_KINDS, PROGRESS_TAG, read_tagged_line
from spleen_tools.run import progress_lines as lines
from spleen_tools.run.formatting import clock_time, mmss

# NVFlare's ScatterAndGather on the server: "<asctime> - ... - Round 3 started." / "... Round 3 finished."
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_FL_ROUND = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*\bRound (\d+) (started|finished)\.\s*$")


def parse_event(line: str) -> dict | None:
    """One log line -> an event dict with ``kind`` ("round", "cross_site", "info", "he" or "fl_round"), else None.

    Progress lines need a ``site`` and a known ``kind``; HE lines a ``side`` and a ``stage``. ``fl_round`` events
    are the server's round start or end, with the log line's time as ``at`` (seconds since the epoch).
    """
    tagged = read_tagged_line(line)
    if tagged is None:
        return _fl_round_event(line)
    tag, fields = tagged
    stamp = _STAMP.match(line)
    if stamp and "at" not in fields:
        fields["at"] = dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    if tag == HE_TAG:
        return {**fields, "kind": "he"} if "side" in fields and "stage" in fields else None
    if tag == PROGRESS_TAG and "site" in fields and fields.get("kind") in PROGRESS_KINDS:
        if fields["kind"] in ("round", "final") and not isinstance(fields.get("round"), int):
            return None
        return fields
    return None


def _fl_round_event(line: str) -> dict | None:
    match = _FL_ROUND.match(line)
    if not match:
        return None
    stamp, rnd, stage = match.groups()
    at = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return {"kind": "fl_round", "side": "server", "round": int(rnd), "stage": stage, "at": at}


class LogFollower:
    """Reads new lines from log files under some folders (``log.txt`` and ``<job_id>/log.txt``)."""

    def __init__(self, roots: Iterable[Path], patterns: tuple[str, ...] = ("log.txt", "*/log.txt")) -> None:
        self.roots = [Path(r) for r in roots]
        self.patterns = patterns
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, str] = {}

    def files(self) -> list[Path]:
        found = []
        for root in self.roots:
            for pattern in self.patterns:
                found.extend(p for p in root.glob(pattern) if p.is_file())
        return sorted(set(found))

    def skip_existing(self) -> None:
        """Start after what the files hold now (lines from earlier jobs are not ours)."""
        for path in self.files():
            self._offsets[path] = path.stat().st_size

    def poll(self) -> list[str]:
        lines: list[str] = []
        for path in self.files():
            offset = self._offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                continue
            if not chunk:
                continue
            self._offsets[path] = offset + len(chunk)
            text = self._partial.pop(path, "") + chunk.decode(errors="replace")
            *complete, last = text.split("\n")
            if last:
                self._partial[path] = last
            lines.extend(complete)
        return lines


@dataclass
class Progress:
    """Collects progress events; knows when a round is complete (all sites reported it)."""

    sites: list[str]
    rounds: int
    start: float = field(default_factory=time.time)  # wall clock: log lines carry wall-clock times
    per_round: dict[int, dict[str, dict]] = field(default_factory=dict)
    round_done_at: dict[int, float] = field(default_factory=dict)
    cross_site_local: dict[str, float] = field(default_factory=dict)
    final_dice: dict[str, float] = field(default_factory=dict)  # each site's score of the last global model
    he_events: list[dict] = field(default_factory=list)
    fl_round_marks: dict[int, dict[str, float]] = field(default_factory=dict)
    data_errors: list[str] = field(default_factory=list)  # "site: file: what is wrong; the fix"
    dropped: list[dict] = field(default_factory=list)  # the server's "dropped" events: site, round, waited_s, at
    resumed: list[dict] = field(default_factory=list)  # the server's "resumed" events: job, round (the next one)
    job_errors: list[str] = field(default_factory=list)  # "resume_error" reasons, participants' "install_error"s
    devices: dict[str, str] = field(default_factory=dict)  # site -> what it trains on ("cpu", "cuda:0 (...)")
    gpu_peak_mb: dict[str, float] = field(default_factory=dict)  # site -> peak GPU memory of its training process
    dp_budget_notes: list[str] = field(default_factory=list)  # sites whose DP budget allows no further round
    _seen: set = field(default_factory=set)

    def add(self, event: dict, now: float | None = None) -> list[str]:
        """Record one parsed event; return the lines to print about it (maybe none), each after the run's clock."""
        now = time.time() if now is None else now
        kind = event["kind"]
        key = (
            kind,
            event.get("site") or event.get("side"),
            event.get("round"),
            event.get("stage"),
            event.get(KEY_METRIC) if kind == "cross_site" else None,
            event.get("problem"),
            event.get("job"),  # a job resumed twice from the same round
        )
        if key in self._seen:  # the same line can show up in the site log and the job log
            return []
        self._seen.add(key)
        handler = self._HANDLERS.get(kind)
        return [f"{self._clock(now)} {text}" for text in handler(self, event, now)] if handler else []

    # -- one handler per kind: records the event, returns what to say about it ------------------------------
    def _he(self, event: dict, now: float) -> list[str]:
        self.he_events.append(event)
        return []

    def _fl_round(self, event: dict, now: float) -> list[str]:
        self.fl_round_marks.setdefault(event["round"], {})[event["stage"]] = float(event["at"])
        return []

    def _resume_error(self, event: dict, now: float) -> list[str]:
        self.job_errors.append(f"server: {event.get('reason')}")
        return [self.job_errors[-1]]

    def _participant_error(self, event: dict, now: float) -> list[str]:
        """A participant refused the job or stopped (install, DP settings, DP budget): the problem names it."""
        self.job_errors.append(str(event.get("problem")))
        return [self.job_errors[-1]]

    def _dp_budget(self, event: dict, now: float) -> list[str]:
        self.dp_budget_notes.append(str(event.get("note")))
        return [self.dp_budget_notes[-1]]

    def _data_error(self, event: dict, now: float) -> list[str]:
        self.data_errors.append(f"{event['site']}: {event.get('problem')}")
        return [self.data_errors[-1]]

    def _device(self, event: dict, now: float) -> list[str]:
        self.devices[event["site"]] = str(event.get("device"))
        return [lines.device(event["site"], self.devices[event["site"]])]

    def _cross_site(self, event: dict, now: float) -> list[str]:
        if isinstance(event.get(KEY_METRIC), float | int):
            self.cross_site_local[event["site"]] = float(event[KEY_METRIC])
        return [lines.cross_site(event["site"], event.get(KEY_METRIC))]

    def _final(self, event: dict, now: float) -> list[str]:
        if isinstance(event.get("global_dice"), float | int):
            self.final_dice[event["site"]] = float(event["global_dice"])
        return [lines.final(event["site"], event.get("global_dice"))]

    def _round(self, event: dict, now: float) -> list[str]:
        rnd, site = event["round"], event["site"]
        self.per_round.setdefault(rnd, {})[site] = event
        if isinstance(event.get("gpu_peak_mb"), int | float):
            self.gpu_peak_mb[site] = max(self.gpu_peak_mb.get(site, 0.0), float(event["gpu_peak_mb"]))
        out = [lines.site_round(event, self.rounds)]
        if set(self.per_round[rnd]) >= self._expected(rnd) and rnd not in self.round_done_at:
            # the log line's own time: several rounds can finish between two polls of the logs
            self.round_done_at[rnd] = max(float(event.get("at", now)), self.start)
            out.append(
                lines.round_done(rnd, self.rounds, self.round_times()[-1], now - self.start, self.estimate_left(now))
            )
        return out

    def _expected(self, rnd: int) -> set[str]:
        """The sites a round waits for in the progress lines: all but those the server reported dropped in it."""
        return set(self.sites) - {d["site"] for d in self.dropped if d.get("round") == rnd}

    def _dropped(self, event: dict, now: float) -> list[str]:
        rnd = event.get("round")
        self.dropped.append({k: event.get(k) for k in ("site", "round", "task", "waited_s", "at")})
        when = clock_time(event.get("at"))
        number = rnd + 1 if isinstance(rnd, int) else "?"
        waited = event.get("waited_s") or 0
        out = [
            f"{event['site']} dropped: no {event.get('task', 'train')} result in round {number} "
            f"(the server waited {waited:.0f} s; {when})"
        ]
        reported = self.per_round.get(rnd, {})
        if isinstance(rnd, int) and reported and set(reported) >= self._expected(rnd) and rnd not in self.round_done_at:
            self.round_done_at[rnd] = max(float(event.get("at", now)), self.start)
            out.append(f"round {rnd + 1}/{self.rounds} done without {event['site']}")
        return out

    def _resumed(self, event: dict, now: float) -> list[str]:
        """A job that resumes a lost one runs its rounds from ``round`` again: what was seen of them is forgotten."""
        rnd = int(event.get("round") or 0)
        self.resumed.append({"job": event.get("job"), "round": rnd, "at": event.get("at")})
        for rounds in (self.per_round, self.round_done_at, self.fl_round_marks):
            for r in [r for r in rounds if r >= rnd]:
                del rounds[r]
        self._seen = {k for k in self._seen if not (isinstance(k[2], int) and k[2] >= rnd) or k[0] == "resumed"}
        if not rnd:
            return [f"the server restarted job {event.get('job')} from its initial model"]
        left = f"rounds {rnd + 1}..{self.rounds} to go" if rnd < self.rounds else "only the final validations left"
        return [f"the server resumed job {event.get('job')} from its model of round {rnd} ({left})"]

    def dropped_sites(self) -> list[str]:
        return sorted({d["site"] for d in self.dropped})

    def round_times(self) -> list[float]:
        times, prev = [], self.start
        for rnd in sorted(self.round_done_at):
            times.append(round(self.round_done_at[rnd] - prev, 1))
            prev = self.round_done_at[rnd]
        return times

    def fl_round_times(self) -> list[float]:
        """The server's round durations (round started -> finished, from its log's timestamps), in round order."""
        times = []
        for rnd in sorted(self.fl_round_marks):
            marks = self.fl_round_marks[rnd]
            if "started" in marks and "finished" in marks:
                times.append(round(marks["finished"] - marks["started"], 1))
        return times

    def site_work_times(self) -> list[float | None]:
        """Per round, the slowest site's own work (global-model validation + local training), from ``work_s``."""
        out = []
        for rnd in sorted(self.per_round):
            works = [e["work_s"] for e in self.per_round[rnd].values() if isinstance(e.get("work_s"), float | int)]
            out.append(round(max(works), 1) if works else None)
        return out

    def estimate_left(self, now: float) -> float:
        """Mean round time x rounds left, plus about half a round for cross-site validation."""
        times = self.round_times()
        if not times:
            return math.nan
        mean = sum(times) / len(times)
        return max(0.0, mean * (self.rounds - len(times)) + 0.5 * mean)

    def dp_epsilons(self) -> dict[str, dict[str, float]]:
        """Each site's epsilon after each round ({round: {site: epsilon}}), from DP rounds' lines; empty without DP."""
        return {
            str(r): {s: float(e["dp_epsilon"]) for s, e in sorted(sites.items()) if "dp_epsilon" in e}
            for r, sites in sorted(self.per_round.items())
            if any("dp_epsilon" in e for e in sites.values())
        }

    def untrained_dice(self) -> dict[str, float]:
        return {s: float(e["global_dice"]) for s, e in self.per_round.get(0, {}).items() if "global_dice" in e}

    def _clock(self, now: float) -> str:
        return f"[{mmss(now - self.start)}]"

    _HANDLERS = {
        "he": _he,
        "fl_round": _fl_round,
        "dropped": _dropped,
        "resumed": _resumed,
        "resume_error": _resume_error,
        "install_error": _participant_error,
        "dp_error": _participant_error,
        "dp_budget": _dp_budget,
        "data_error": _data_error,
        "device": _device,
        "cross_site": _cross_site,
        "final": _final,
        "round": _round,
    }


def follow(follower: LogFollower, progress: Progress, out) -> None:
    """Read the new log lines and print what they say."""
    for line in follower.poll():
        event = parse_event(line)
        if event:
            for message in progress.add(event):
                out(message)
