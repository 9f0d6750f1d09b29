"""Write the HE key fingerprint into every site kit of a POC prepared with ``nvflare poc prepare -he``.

The HE job's sites put it in every update and the server refuses updates under another key (a re-provisioned
site). Kits provisioned with workspaces/secure_project.yml have it already (HEKeyFingerprintBuilder).
"""

from __future__ import annotations

import sys
from pathlib import Path

from spleen_tools.cli import OneLineParser
from spleen_tools.systems.he_kits import fingerprint_kits


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="spleen-he-fingerprint", description=__doc__)
    parser.add_argument(
        "kits", type=Path, help="the folder with the kits, e.g. $NVFLARE_POC_WORKSPACE/example_project/prod_00"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fingerprint, files = fingerprint_kits(args.kits)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"HE key fingerprint {fingerprint[:16]}.. written to {len(files)} site kits: {', '.join(map(str, files))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
