"""Export a run's (or a downloaded job's) global model as a verified MONAI bundle.

Writes ``<out>/spleen_ct_segmentation/`` with models/model.pt, models/model.ts (TorchScript) and metadata.json
(new version, changelog line, cross-site Dice, provenance), then runs MONAI's verify_metadata and
verify_net_in_out on it and checks the TorchScript model against the state dict.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from spleen_tools.cli import OneLineParser
from spleen_tools.model_bundle import EXPORT_DIR, MODEL_KINDS, ExportError, export_bundle, find_job, source_from_job
from spleen_tools.model_bundle import verify_bundle as verify
from spleen_tools.paths import RUNS_DIR


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="spleen-export", description=__doc__)
    parser.add_argument(
        "source",
        nargs="?",
        type=Path,
        default=RUNS_DIR / "latest",
        help="a run directory of ./run_experiment.sh or a downloaded job folder (default: runs/latest)",
    )
    parser.add_argument("--model", choices=sorted(MODEL_KINDS), default="final", help="which global model")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: <source>/{EXPORT_DIR})")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="the weights to export instead of the server's (HE job: a site's decrypted copy, "
        "<site>/<job_id>/app_<site>/global_model/FL_global_model.pt); provenance still from SOURCE",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source_dir = args.source.resolve()
    try:
        source = source_from_job(find_job(source_dir), args.model)
        if args.checkpoint is not None:
            source = replace(source, checkpoint=args.checkpoint.resolve())
        bundle = export_bundle(source, args.out or source_dir / EXPORT_DIR)
        checked = verify(bundle)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model bundle: {bundle} (version {checked['version']}, {args.model} global model of job {source.job_id})")
    diff = checked["torchscript_max_abs_diff"]
    print(f"verified: metadata, network input/output, TorchScript = state dict (max |diff| {diff:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
