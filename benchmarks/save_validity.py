"""Record a finished validity study (``spleen-bench validity``) for docs/BENCHMARKS.md.

Usage: ``.venv/bin/python benchmarks/save_validity.py [runs/bench/validity/latest] [--name validity]``; then
``.venv/bin/python benchmarks/write_benchmarks_md.py``. Each setting's Dice chart goes to
``docs/images/<name>_<setting>_dice.png`` (``<name>_dice.png`` for a study of one setting). The study of IID and
non-IID is recorded as ``validity``; the FL methods in the contrast-phase setting as ``validity_phase`` (``--name
validity_phase``), each its own section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from pathlib import Path

import record

RECORD_NAMES = ("validity", "validity_phase", "validity_phase_scaffold", "validity_scaffold")
DEFAULT_RUN = Path(__file__).resolve().parents[1] / "runs" / "bench" / "validity" / "latest"
IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"  # each setting's Dice chart, for BENCHMARKS.md
# What the record keeps of each seed and of each setting (the curves, data paths and models stay in the run).
SEED_KEYS = ("table", "expectations", "site_copies", "seconds", "epoch_seconds", "errors")
SETTING_KEYS = ("sites", "methods", "held_by_sites", "summary", "table", "verdicts", "phase_goal", "errors")


def study_command(settings: dict) -> str:
    """The ``spleen-bench validity`` command line that reproduces a study's settings."""
    args = ["--rounds", settings["rounds"], "--local-epochs", settings["local_epochs"], "--sites", settings["sites"]]
    args += ["--settings", ",".join(settings["settings"])]
    if "seeds" in settings:
        args += ["--seeds", ",".join(map(str, settings["seeds"])), "--methods", ",".join(settings["methods"])]
    else:  # a study from before seeds and methods
        args += ["--seed", settings["seed"]]
    return shlex.join([".venv/bin/spleen-bench", "validity", *map(str, args)])


def demote_headings(markdown: str) -> str:
    """One level down (the study's ``## setting`` under BENCHMARKS.md's ``## validity study``)."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


def recorded_setting(result: dict) -> dict:
    """What the record keeps of one setting of validity.json: format 2 (seeds) or format 1 (the one seed)."""
    if "seeds" not in result:
        return {k: result.get(k) for k in ("table", "expectations", "seconds", "epoch_seconds")}
    kept = {k: result[k] for k in SETTING_KEYS if k in result}
    kept["seeds"] = {seed: {k: run.get(k) for k in SEED_KEYS} for seed, run in result["seeds"].items()}
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", nargs="?", type=Path, default=DEFAULT_RUN, help="a validity study's folder")
    parser.add_argument(
        "--name",
        choices=RECORD_NAMES,
        default=RECORD_NAMES[0],
        help="the record: validity (IID and non-IID), validity_phase (the methods in the contrast-phase setting), "
        "validity_phase_scaffold and validity_scaffold (SCAFFOLD in those settings, studies of their own)",
    )
    args = parser.parse_args(argv)
    study = json.loads((args.study_dir / "validity.json").read_text())
    markdown = (args.study_dir / "validity.md").read_text().split("\n", 1)[1].strip()  # without its title
    result = {"settings": study["settings"], "seconds": study.get("seconds"), "markdown": demote_headings(markdown)}
    if "format" in study:
        result["format"] = study["format"]
    for name, setting in study["results"].items():
        result[name] = recorded_setting(setting)
        chart = args.study_dir / f"{name}_dice.png"
        if chart.is_file():
            image = f"{args.name}_dice.png" if len(study["results"]) == 1 else f"{args.name}_{name}_dice.png"
            print(f"copied {shutil.copyfile(chart, IMAGES / image)}")
    print(f"saved {record.save(args.name, result, command=study_command(study['settings']))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
