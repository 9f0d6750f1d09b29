"""A site admin's own policy, written into the site's kit (``<kit>/local``): which classes a job may name, no job
code, and optionally: encrypt everything this site sends (HE sites), keep the local model at home in cross-site
evaluation, the statistics it lets leave (a minimum count of cases, a bins share). The site restarts to apply it.
``--show`` prints what a kit allows now.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from spleen_tools.cli import OneLineParser
from spleen_tools.systems.site_policy import SitePolicy, kit_policy, write_site_policy


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="spleen-site-policy", description=__doc__)
    parser.add_argument("kit", type=Path, help="the site's startup kit folder (with startup/ and local/)")
    parser.add_argument("--encrypt-results", action="store_true", help="every model this site sends leaves encrypted")
    parser.add_argument("--keep-local-model", action="store_true", help="no local model leaves in cross-site eval")
    parser.add_argument(
        "--stats-min-count",
        type=int,
        help="statistics job: a feature of fewer cases leaves with its count only (no histogram, mean or range)",
    )
    parser.add_argument(
        "--stats-max-bins-percent",
        type=float,
        help="statistics job: a histogram of per-case values needs fewer bins than this %% of the cases",
    )
    parser.add_argument("--allow-byoc", action="store_true", help="development only: accept jobs that carry code")
    parser.add_argument("--show", action="store_true", help="print the kit's policy and change nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.kit / "startup" / "fed_client.json").is_file():
        print(
            f"error: {args.kit} is not a site's startup kit (no startup/fed_client.json): name the kit folder",
            file=sys.stderr,
        )
        return 2
    try:
        if not args.show:
            policy = SitePolicy(
                args.allow_byoc,
                args.encrypt_results,
                args.keep_local_model,
                stats_min_count=args.stats_min_count,
                stats_max_bins_percent=args.stats_max_bins_percent,
            )
            for path in write_site_policy(args.kit, policy):
                print(f"wrote {path}")
        print(json.dumps(kit_policy(args.kit), indent=2))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
