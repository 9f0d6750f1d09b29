"""Where a federated round's time goes: the server's round broken down along the slowest site's path.

Reads finished runs of the one command (``runs/<timestamp>/``: the downloaded server job log and the sites' job
logs) and matches each training task by its id from the server handing it out to the result coming back:

  dispatch  round started -> the server hands the task to the site (the site polls for tasks)
  receive   handed out -> the site has the task (model download, deserialisation)
  prepare   the site has the task -> its own work starts (weights into the bundle's network)
  work      the site's validation of the received model + local training (``work_s`` of its [spleen] line)
  pack      work done -> the site starts sending (weight difference, serialisation)
  send      sending -> the server has the result
  server    the last result -> round finished (waiting, aggregation, persisting)

Usage: ``.venv/bin/python benchmarks/round_cost.py runs/latest [more run dirs]`` (prints figures, writes
``round_cost.json`` into each run directory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_tools.run.progress import parse_event  # noqa: E402
from spleen_tools.run.summary import RunSummary  # noqa: E402

STAGES = ("dispatch", "receive", "prepare", "work", "pack", "send", "server")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_SERVER = {
    "start": re.compile(r"Round (\d+) started\."),
    "finish": re.compile(r"Round (\d+) finished\."),
    "handout": re.compile(r"return task to client\.\s+client_name: (\S+)\s+task_name: train\s+task_id: (\S+)"),
    "result": re.compile(r"got result from client (\S+) for task: name=train, id=([0-9a-f-]+)"),
}
_SITE = {
    "got": re.compile(r"got task assignment: name=train, id=([0-9a-f-]+)"),
    "send": re.compile(r"task_name=train, task_id=([0-9a-f-]+)\] - start to send task result"),
}


def _lines(path: Path):
    for line in path.read_text(errors="replace").splitlines():
        stamp = _STAMP.match(line)
        if stamp:
            yield dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), line


def server_events(log: Path) -> tuple[dict, dict, dict, dict]:
    """Round starts and finishes, and per task id: (site, handout time) and result time."""
    starts, finishes, handouts, results = {}, {}, {}, {}
    for at, line in _lines(log):
        for kind, pattern in _SERVER.items():
            match = pattern.search(line)
            if not match:
                continue
            if kind == "start":
                starts[int(match.group(1))] = at
            elif kind == "finish":
                finishes[int(match.group(1))] = at
            elif kind == "handout":
                handouts.setdefault(match.group(2), (match.group(1), at))
            else:
                results.setdefault(match.group(2), at)
    return starts, finishes, handouts, results


def site_events(log: Path) -> dict[str, dict]:
    """Per task id: when the site got it, its [spleen] round line (time, round, work_s), when it started sending."""
    tasks: dict[str, dict] = {}
    current = None
    for at, line in _lines(log):
        got = _SITE["got"].search(line)
        if got:
            current = tasks.setdefault(got.group(1), {"got": at})
            continue
        send = _SITE["send"].search(line)
        if send and send.group(1) in tasks:
            tasks[send.group(1)].setdefault("send", at)
            continue
        event = parse_event(line)
        if current is not None and event and event.get("kind") == "round":
            current.update(done=at, round=event["round"], work=float(event.get("work_s") or 0.0))
    return tasks


def breakdown(run_dir: Path) -> list[dict]:
    """One row per round: the stages along the slowest site's path, the round time and the site's work."""
    summary = RunSummary.load(run_dir)
    server_log = next((run_dir / "job_result").rglob("workspace/log.txt"))
    starts, finishes, handouts, results = server_events(server_log)
    site_logs = {site: Path(summary.paths[f"log_{site}"]) / summary.job_id / "log.txt" for site in summary.sites}
    per_site = {site: site_events(log) for site, log in site_logs.items()}
    rows = []
    for rnd in sorted(set(starts) & set(finishes)):
        paths = []
        for task_id, (site, handed) in handouts.items():
            task = per_site.get(site, {}).get(task_id, {})
            if task.get("round") == rnd and task_id in results and "send" in task:
                paths.append((results[task_id], site, handed, task))
        if not paths:
            continue
        back, site, handed, task = max(paths)  # the slowest site sets the pace
        work_start = task["done"] - task["work"]
        stages = {
            "dispatch": handed - starts[rnd],
            "receive": task["got"] - handed,
            "prepare": work_start - task["got"],
            "work": task["work"],
            "pack": task["send"] - task["done"],
            "send": back - task["send"],
            "server": finishes[rnd] - back,
        }
        round_s = finishes[rnd] - starts[rnd]
        rows.append({"round": rnd, "site": site, "round_s": round_s, **{k: round(v, 2) for k, v in stages.items()}})
    return rows


def mean_row(rows: list[dict]) -> dict:
    return {k: round(sum(r[k] for r in rows) / len(rows), 2) for k in ("round_s", *STAGES)} if rows else {}


def report(run_dir: Path) -> dict:
    rows = breakdown(run_dir)
    later = mean_row([r for r in rows if r["round"] > 0])
    result = {"run_dir": str(run_dir), "rounds": rows, "round_0": mean_row(rows[:1]), "later_rounds_mean": later}
    if later:
        result["ratio_round_to_work"] = round(later["round_s"] / later["work"], 3)
        fixed = {k: later[k] for k in STAGES if k != "work"}
        result["largest_fixed_cost"] = max(fixed, key=fixed.get)
    (run_dir / "round_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories of the one command")
    parser.add_argument("--labels", nargs="+", default=[], help="a label per run dir (what differs between them)")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/round_cost.json")
    args = parser.parse_args(argv)
    results = []
    labels = dict(zip(args.run_dirs, args.labels, strict=False))
    header = f"{'round':>5} {'site':>7} {'round_s':>8} " + " ".join(f"{s:>8}" for s in STAGES)
    for run_dir in args.run_dirs:
        result = {"label": labels.get(run_dir, run_dir.name), **report(run_dir.resolve())}
        results.append(result)
        print(f"{result['run_dir']}\n{header}")
        for row in result["rounds"]:
            print(
                f"{row['round']:>5} {row['site']:>7} {row['round_s']:8.2f} "
                + " ".join(f"{row[s]:8.2f}" for s in STAGES)
            )
        later = result["later_rounds_mean"]
        if later:
            print(f"{'mean':>5} {'r>=1':>7} {later['round_s']:8.2f} " + " ".join(f"{later[s]:8.2f}" for s in STAGES))
            print(
                f"server round / slowest site's work (rounds >= 1): {result['ratio_round_to_work']}; largest fixed "
                f"cost: {result['largest_fixed_cost']} ({later[result['largest_fixed_cost']]} s)"
            )
    if args.save:
        print(f"saved {record.save('round_cost', {'runs': results})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
