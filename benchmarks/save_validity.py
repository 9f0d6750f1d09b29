"""Record a finished validity study (``spleen-bench validity``) for docs/BENCHMARKS.md.

Usage: ``.venv/bin/python benchmarks/save_validity.py [runs/bench/validity/latest]``; then
``.venv/bin/python benchmarks/write_benchmarks_md.py``.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import record

DEFAULT_RUN = Path(__file__).resolve().parents[1] / "runs" / "bench" / "validity" / "latest"


def study_command(settings: dict) -> str:
    """The ``spleen-bench validity`` command line that reproduces a study's settings."""
    args = ["--rounds", settings["rounds"], "--local-epochs", settings["local_epochs"], "--sites", settings["sites"]]
    args += ["--settings", ",".join(settings["settings"]), "--seed", settings["seed"]]
    return shlex.join([".venv/bin/spleen-bench", "validity", *map(str, args)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", nargs="?", type=Path, default=DEFAULT_RUN, help="a validity study's folder")
    args = parser.parse_args(argv)
    study = json.loads((args.study_dir / "validity.json").read_text())
    markdown = (args.study_dir / "validity.md").read_text().split("\n", 1)[1].strip()  # without its title
    markdown = markdown.replace("\n## ", "\n### ")
    if markdown.startswith("## "):
        markdown = "#" + markdown
    result = {"settings": study["settings"], "seconds": study.get("seconds"), "markdown": markdown}
    for name, setting in study["results"].items():
        result[name] = {k: setting.get(k) for k in ("table", "expectations", "seconds", "epoch_seconds")}
    print(f"saved {record.save('validity', result, command=study_command(study['settings']))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
