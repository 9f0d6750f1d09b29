"""Thin command-line entry points over the host package."""

from __future__ import annotations

import argparse

from spleen_tools.jobs import DPOptions


class OneLineParser(argparse.ArgumentParser):
    """Bad input -> one line ``error: ...`` on stderr, exit 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default said once: none added where the help names its own default, or where there is none to say
    (``None``, a flag's ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "default:" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_dp_options(p: argparse.ArgumentParser) -> None:
    """DP-SGD at the sites (spleen_flare.dp): the job's side; a site may cap epsilon and delta further."""
    p.add_argument(
        "--dp",
        type=float,
        metavar="EPSILON",
        help="train with DP-SGD at every site (Opacus), noise planned so that each site's epsilon after the last round "
        "is EPSILON (per training case, at --dp-delta); with --job he too",
    )
    p.add_argument("--dp-noise", type=float, metavar="SIGMA", help="instead of --dp: this noise multiplier")
    p.add_argument("--dp-clip", type=float, default=1.0, help="--dp: per-case gradient clipping norm")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="--dp: delta of the (epsilon, delta) guarantee")
    p.add_argument(
        "--dp-max-epsilon",
        type=float,
        help="--dp-noise: a site stops before a round would take it past this epsilon (default with --dp: EPSILON)",
    )


def dp_options(args: argparse.Namespace) -> DPOptions | None:
    if args.dp is None and args.dp_noise is None:
        return None
    return DPOptions(args.dp, args.dp_noise, args.dp_clip, args.dp_delta, args.dp_max_epsilon)
