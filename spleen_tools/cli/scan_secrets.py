"""Check that a secure HE run leaked no secret: scan its folders for private keys and secret TenSEAL contexts.

Give the run directory, the MLflow store, a downloaded job, the log folders (any number of roots) and, with --kits,
the provisioning output (or a copy of prod_NN) that holds the startup kits: every private key and secret TenSEAL
context found under its startup/ and state/ folders must appear nowhere under the roots, whole or in parts: as bytes,
hex or base64 (any alignment, any line width, JSON-escaped), in UTF-16 text. Also flags any PEM private key and any
file that loads as a TenSEAL context with a secret key. Symlinks are not followed; gzip, bzip2, xz, zstd, tar and zip
files are opened (nested too); the provisioned secret files themselves are skipped at their provisioned paths only
(a hard link or copy elsewhere is a finding). An archive that unpacks to more than --max-unpacked (one stream or
member; four times that for all of one file) is not fully scanned: that fails the scan, naming the file.
Exit 0: nothing found; 1: one ``error:`` line per finding (or file that could not be checked in full); 2: bad input.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from spleen_tools.cli import OneLineParser
from spleen_tools.run.kit_secrets import known_secrets
from spleen_tools.run.secrets_scan import MEMBER_CAP, ScanReport, scan


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="spleen-scan-secrets", description=__doc__)
    parser.add_argument("roots", type=Path, nargs="+", metavar="ROOT", help="folder or file to scan")
    parser.add_argument(
        "--kits",
        type=Path,
        action="append",
        required=True,
        metavar="PROVISIONING_DIR",
        help="provisioning output with the startup kits (repeat)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument(
        "--max-unpacked",
        type=int,
        default=MEMBER_CAP >> 20,
        metavar="MIB",
        help="most MiB one compressed stream or archive member may unpack to; 4x for all of one file "
        f"(default {MEMBER_CAP >> 20})",
    )
    return parser


def _bad_input(roots: list[Path], kits: list[Path], max_unpacked: int) -> str | None:
    for root in roots:
        if not root.exists():
            return f"{root}: no such file or folder"
        if not os.access(root, os.R_OK | (os.X_OK if root.is_dir() else 0)):
            return f"{root}: cannot be read"
    for kit in kits:
        if not kit.is_dir():
            return f"{kit}: not a folder (--kits wants the provisioning output)"
    if max_unpacked < 1:
        return f"--max-unpacked {max_unpacked}: give at least 1 (MiB)"
    return None


def _write_json(path: Path, roots: list[Path], kits: list[Path], names: list[str], report: ScanReport) -> None:
    doc = {"roots": [str(r) for r in roots], "kits": [str(k) for k in kits], "secrets": names, **asdict(report)}
    for key in ("findings", "unchecked"):
        doc[key] = [f._asdict() for f in getattr(report, key)]
    path.write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if problem := _bad_input(args.roots, args.kits, args.max_unpacked):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    secrets = known_secrets(args.kits)
    if not secrets:
        kits = ", ".join(map(str, args.kits))
        print(f"error: {kits}: no private keys or secret TenSEAL contexts under startup/ or state/", file=sys.stderr)
        return 2
    cap = args.max_unpacked << 20
    report = scan(args.roots, secrets, member_cap=cap, file_cap=4 * cap)
    if args.json:
        _write_json(args.json, args.roots, args.kits, [s.name for s in secrets], report)
    for finding in report.findings + report.unchecked:
        print(f"error: {finding.file}: {finding.what} ({finding.detail})", file=sys.stderr)
    if not report.clean:
        return 1
    print(f"scanned {report.files} files ({report.bytes / 1e6:.1f} MB): no secrets found")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
