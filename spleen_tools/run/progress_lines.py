"""What the one command says about the sites' progress events (the run's clock goes in front)."""

from __future__ import annotations

from spleen_tools.run.formatting import fmt, mmss


def site_round(event: dict, rounds: int) -> str:
    return (
        f"round {event['round'] + 1}/{rounds} {event['site']}: loss {fmt(event.get('loss'))}, "
        f"local Dice {fmt(event.get('local_dice'))} (global model before training: {fmt(event.get('global_dice'))})"
        + (f"; DP epsilon {fmt(event['dp_epsilon'])}" if "dp_epsilon" in event else "")
    )


def round_done(rnd: int, rounds: int, took: float, elapsed: float, left: float) -> str:
    return f"round {rnd + 1}/{rounds} done in {took:.0f} s; elapsed {mmss(elapsed)}, about {mmss(left)} left"


def device(site: str, what: str) -> str:
    return f"{site} trains on {what}"


def cross_site(site: str, dice) -> str:
    return f"cross-site validation: {site} scored a model, Dice {fmt(dice)}"


def final(site: str, dice) -> str:
    return f"final validation: {site} scored the last global model, Dice {fmt(dice)}"
