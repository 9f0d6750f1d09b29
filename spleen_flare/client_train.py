"""Client API training script: one site trains and validates the spleen bundle under NVFlare.

Run in-process by ``SiteTrainingExecutor`` (``site_executor``) from the site's own installation. Tasks:
- train: score the received global model on local validation data, train ``--local_epochs``, send weights;
- validate: score the received model, send its metrics (the last global model after training, with a round
  number, which the site also keeps: in the HE job only the sites can read it; cross-site evaluation's models,
  without);
- submit_model (cross-site evaluation): send this site's best locally trained weights.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nvflare.client as flare
import torch
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.metrics_exchange.metrics_sender import ANALYTICS_BOOTSTRAP_FILE, MetricsSender

from spleen_flare.bundle_runner import BundleRunner, to_tensor_dict
from spleen_flare.contract import (
    BUNDLE_NAME,
    DP_LAST_ROUND_KEY,
    FINAL_GLOBAL_MODEL,
    GLOBAL_METRIC,
    KEY_METRIC,
    LAST_LOCAL_UPDATE,
    PROGRESS_TAG,
    tagged_line,
)
from spleen_flare.data_check import SiteDataError, check_site_cases  # noqa: F401 (SiteDataError: callers catch it here)
from spleen_flare.dp import DEFAULT_DELTA, DEFAULT_MAX_GRAD_NORM, DPBudgetSpent, DPError, DPSettings, with_site_limits
from spleen_flare.scaffold import split_controls, with_controls
from spleen_flare.site_data import site_data
from spleen_flare.site_install import job_problems
from spleen_flare.stats_handler import NVFlareStatsHandler

NUM_STEPS_KEY = "NUM_STEPS_CURRENT_ROUND"
DP_EPSILON_METRIC = "dp_epsilon"  # a site's epsilon after each round, as MLflow shows it
ROUND_LINE_DP = ("dp_epsilon", "dp_noise_multiplier", "dp_steps")  # the rest is in the site's DP-SGD line


def progress(**fields) -> None:
    """One progress line; print() lands in the job's log.txt (NVFlare redirects it), which the host follows."""
    print(tagged_line(PROGRESS_TAG, **fields), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--app_root", required=True, help="the job's app folder (given by SiteTrainingExecutor)")
    parser.add_argument(
        "--config_files",
        default="configs/train.json",
        help="comma-separated bundle config files (relative to the bundle root), later ones override earlier ones",
    )
    parser.add_argument("--local_epochs", type=int, default=1, help="local epochs per FL round")
    parser.add_argument("--fedprox_mu", type=float, default=0.0, help="FedProx: weight of the proximal term (0: off)")
    parser.add_argument(
        "--fedbn", type=int, choices=(0, 1), default=0, help="FedBN: BatchNorm layers stay at the site (1: on)"
    )
    parser.add_argument(
        "--scaffold", type=int, choices=(0, 1), default=0, help="SCAFFOLD: control variates correct each step (1: on)"
    )
    dp = parser.add_argument_group("differential privacy (DP-SGD at this site, spleen_flare.dp; 0: not set)")
    dp.add_argument("--dp_noise_multiplier", type=float, default=0.0, help="noise std / clipping norm (sigma)")
    dp.add_argument("--dp_target_epsilon", type=float, default=0.0, help="the job's epsilon: sigma planned for it")
    dp.add_argument("--dp_max_grad_norm", type=float, default=DEFAULT_MAX_GRAD_NORM, help="per-case clipping norm")
    dp.add_argument("--dp_delta", type=float, default=DEFAULT_DELTA, help="delta of the (epsilon, delta) reported")
    dp.add_argument("--dp_max_epsilon", type=float, default=0.0, help="stop before a round passes it (0: target)")
    return parser.parse_args()


def dp_settings(args: argparse.Namespace) -> DPSettings | None:
    """The job's DP options, or None when it asks for none."""
    if not (args.dp_noise_multiplier or args.dp_target_epsilon):
        return None
    return DPSettings(
        max_grad_norm=args.dp_max_grad_norm,
        delta=args.dp_delta,
        noise_multiplier=args.dp_noise_multiplier or None,
        target_epsilon=args.dp_target_epsilon or None,
        max_epsilon=args.dp_max_epsilon or None,
    )


def site_dp(site: str, args: argparse.Namespace) -> DPSettings | None:
    """The job's DP options under the site's own limits; methods that bypass per-case clipping are refused."""
    try:
        dp = with_site_limits(dp_settings(args), site)
        if dp and args.fedprox_mu > 0:
            raise DPError("FedProx's proximal term would reach the weights unclipped: use DP with another method")
        if dp and args.fedbn:
            raise DPError("FedBN keeps BatchNorm layers, which DP-SGD cannot train: use DP with another method")
    except DPError as err:
        dp_refused(site, err)
    return dp


def dp_refused(site: str, err: DPError) -> None:
    """One line naming the site and the fix, then the site stops."""
    problem = str(err) if str(err).startswith(site) else f"{site}: {err}"
    progress(kind="dp_error", site=site, problem=problem)
    raise err


@dataclass
class Site:
    """One site's bundle, its metric streams and its name, kept across rounds."""

    name: str
    app_root: Path
    runner: BundleRunner
    sender: MetricsSender
    train_stats: NVFlareStatsHandler
    val_stats: NVFlareStatsHandler
    local_keys: frozenset[str] = frozenset()  # FedBN: weights that never leave the site nor get replaced


def open_site(args: argparse.Namespace) -> Site:
    """The site's datalist, its bundle and the handlers that stream its metrics to the server."""
    app_root = Path(args.app_root).resolve()
    site = flare.get_site_name()
    check_install(site, app_root)
    # where the data is, is the site's to say (its environment, read here once), never the job's
    data = site_data(site)
    training = validation = None
    if data.datalist:
        training, validation = data.lists()
        check_site_cases(site, training + validation)
        progress(
            kind="info", site=site, training=len(training), validation=len(validation), datalist=str(data.datalist)
        )
    else:
        note = f"no site datalist: the bundle's own split of {data.data_dir}"
        progress(kind="info", site=site, datalist=None, note=note)
    dp = site_dp(site, args)
    try:
        runner = BundleRunner(
            app_root / "config" / BUNDLE_NAME,  # the job's copy, checked to be the installed one
            config_files=[f.strip() for f in args.config_files.split(",") if f.strip()],
            dataset_dir=data.data_dir,
            training=training,
            validation=validation,
            dp=dp,
        )
    except DPError as err:
        dp_refused(site, err)
    progress(kind="device", site=site, device=device_name(runner.device))
    sender = MetricsSender(config_file=str(app_root / "config" / ANALYTICS_BOOTSTRAP_FILE))
    sender.init()
    train_stats = NVFlareStatsHandler(sender)
    train_stats.attach(runner.trainer)
    val_stats = NVFlareStatsHandler(sender, iteration_log=False, enabled=lambda: runner.phase == "local")
    val_stats.attach(runner.evaluator)
    local_keys = runner.norm_keys() if args.fedbn else frozenset()
    if args.fedprox_mu > 0:
        runner.use_fedprox(args.fedprox_mu)
    if args.scaffold:
        runner.use_scaffold()
    notes = [
        f"FedProx mu {args.fedprox_mu}" if args.fedprox_mu > 0 else "",
        f"FedBN: {len(local_keys)} weights stay" if args.fedbn else "",
        "SCAFFOLD: control variates correct every step" if args.scaffold else "",
        dp_note(dp, runner) if dp else "",
    ]
    if any(notes):
        progress(kind="info", site=site, note="; ".join(n for n in notes if n))
    return Site(site, app_root, runner, sender, train_stats, val_stats, local_keys)


def dp_note(dp: DPSettings, runner: BundleRunner) -> str:
    privacy = runner.privacy
    if dp.noise_multiplier:
        sigma = f"noise {dp.noise_multiplier:g}"
    else:
        sigma = f"noise planned for epsilon {dp.target_epsilon:g}"
    budget = f", budget epsilon {dp.budget:g}" if dp.budget is not None else ""
    changes = f"; {', '.join(runner.dp_changes)}" if runner.dp_changes else ""
    return (
        f"DP-SGD: {privacy.cases} cases, each drawn with probability {privacy.sample_rate:.3g} per step, "
        f"{sigma}, clipping {dp.max_grad_norm:g}, delta {dp.delta:g}{budget}{changes}"
    )


def device_name(device: torch.device) -> str:
    """What the site trains on, as its log says it: "cpu" or "cuda:0 (NVIDIA H200, 140 GB)"."""
    if device.type != "cuda":
        return str(device)
    props = torch.cuda.get_device_properties(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    given = f"; CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""
    return f"{device} ({props.name}, {props.total_memory / 1e9:.0f} GB{given})"


def gpu_peak_mb(device: torch.device) -> float | None:
    """Peak GPU memory this site's process allocated so far (each site trains in its own process)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


class SiteInstallError(RuntimeError):
    """The job asks for another version of the job side or another bundle than this site installed."""


def check_install(site: str, app_root: Path) -> None:
    """Before any data is read: the job's version and bundle are this site's own; else one line each, and stop."""
    problems = job_problems(app_root, site)
    for problem in problems:
        progress(kind="install_error", site=site, problem=problem)
    if problems:
        raise SiteInstallError(problems[0])


def train(site: Site, model: FLModel, local_epochs: int) -> FLModel:
    """Score the received global model, train on, send the weights with the score."""
    runner = site.runner
    received, controls = split_controls(model.params)  # SCAFFOLD's global control variate travels beside
    runner.set_weights(received, keep=site.local_keys)
    runner.anchor_to_current()  # FedProx, SCAFFOLD: this round's reference is the global model just received
    if runner.scaffold is not None:
        runner.scaffold_start(controls)
    runner.catch_up((model.current_round or 0) * local_epochs)  # a resumed job's first round: steps go on
    if runner.privacy is not None:
        plan_privacy(site, model, local_epochs)
    work_start = time.perf_counter()
    global_dice = runner.evaluate(external=True).get(KEY_METRIC, 0.0)
    site.sender.add(GLOBAL_METRIC, global_dice, AnalyticsDataType.SCALAR, global_step=model.current_round)
    steps = runner.train(local_epochs)
    privacy = runner.privacy.report() if runner.privacy is not None else {}
    if privacy:
        site.sender.add(
            DP_EPSILON_METRIC, privacy["dp_epsilon"], AnalyticsDataType.SCALAR, global_step=model.current_round
        )
    progress(
        kind="round",
        site=site.name,
        round=model.current_round,
        global_dice=global_dice,
        local_dice=runner.last_local_metric,
        loss=site.train_stats.last_epoch_loss,
        steps=steps,
        metrics_sent=site.train_stats.sent + site.val_stats.sent,
        metrics_failed=site.train_stats.failed + site.val_stats.failed,
        work_s=round(time.perf_counter() - work_start, 1),
        gpu_peak_mb=gpu_peak_mb(runner.device),
        **{k: privacy[k] for k in ROUND_LINE_DP if k in privacy},
        **({"dp_delta": f"{privacy['dp_delta']:g}"} if privacy else {}),  # a string: lines round floats to 4 places
    )
    meta = {NUM_STEPS_KEY: steps, **privacy}
    rnd = model.current_round or 0
    if privacy and (model.total_rounds is None or rnd + 1 < model.total_rounds):  # the job's last round: no more
        last = dp_last_round(site, rnd, local_epochs)
        if last:
            meta[DP_LAST_ROUND_KEY] = last
    weights = {k: v for k, v in runner.get_weights().items() if k not in site.local_keys}
    keep_last_update(site, weights, steps, model.current_round)
    if runner.scaffold is not None:  # c + delta c_i: the Client API's DIFF sends delta c_i
        delta = runner.scaffold_end()
        updated = {k: torch.as_tensor(controls[k]) + torch.from_numpy(delta[k]) for k in delta}
        weights = with_controls(weights, updated)
    return FLModel(
        params=weights,
        metrics={KEY_METRIC: global_dice},
        meta=meta,
        current_round=model.current_round,  # result filters (HE) log the round
    )


def dp_last_round(site: Site, rnd: int, local_epochs: int) -> str | None:
    """After a round: if one more would pass the budget, the site says so (one line) and tells the server, which
    ends training when too few sites can go on; None while the budget allows another round."""
    privacy = site.runner.privacy
    try:
        privacy.check_budget(local_epochs * privacy.steps_per_epoch, site.name, rnd + 1)
    except DPBudgetSpent as spent:
        progress(kind="dp_budget", site=site.name, round=rnd, note=str(spent))
        return str(spent)
    return None


def plan_privacy(site: Site, model: FLModel, local_epochs: int) -> None:
    """Before a round: the noise for a target epsilon (first round), and the budget checked for this round's steps;
    a site that would pass it says so in one line and stops."""
    privacy, rnd = site.runner.privacy, model.current_round or 0
    round_steps = local_epochs * privacy.steps_per_epoch
    try:
        if privacy.steps == 0 and rnd > 0:
            raise DPBudgetSpent(
                f"{site.name} cannot account for the rounds before round {rnd} (a resumed job): start a new job with DP"
            )
        if privacy.steps == 0 and privacy.settings.target_epsilon is not None:
            total_steps = ((model.total_rounds or rnd + 1) - rnd) * round_steps
            privacy.plan(total_steps)
            note = f"DP: noise multiplier {privacy.noise_multiplier:.4g} ends {total_steps} steps at epsilon "
            progress(kind="info", site=site.name, note=note + f"{privacy.settings.target_epsilon:g}")
        privacy.check_budget(round_steps, site.name, rnd)
    except DPBudgetSpent as err:
        progress(kind="dp_error", site=site.name, round=rnd, problem=str(err))
        raise


def validate(site: Site, model: FLModel) -> FLModel:
    """Score a received model: the last global model (it carries a round number) or a cross-site one."""
    received, _ = split_controls(model.params)  # SCAFFOLD's final validation: the controls beside the model
    dice = site.runner.evaluate(received, keep=site.local_keys).get(KEY_METRIC)
    if model.current_round is not None:  # the server's final validation of the last global model
        site.sender.add(GLOBAL_METRIC, dice, AnalyticsDataType.SCALAR, global_step=model.current_round)
        progress(kind="final", site=site.name, round=model.current_round, global_dice=dice)
        own = {k: v for k, v in site.runner.get_weights().items() if k in site.local_keys}  # FedBN: its BatchNorm
        keep_final_global_model(site, {**to_tensor_dict(received), **own})
    else:
        progress(kind="cross_site", site=site.name, **{KEY_METRIC: dice})
    return FLModel(metrics={KEY_METRIC: dice if dice is not None else 0.0})


def keep_final_global_model(site: Site, params: dict) -> None:
    """The last global model as this site received it (decrypted in the HE job; with FedBN, with this site's own
    BatchNorm layers), in NVFlare's PT layout, for ``spleen-export --checkpoint``: the HE server holds only
    ciphertext, the sites hold the key; a FedBN server holds no trained BatchNorm layer."""
    path = site.app_root / FINAL_GLOBAL_MODEL
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": to_tensor_dict(params)}, path)
    progress(kind="info", site=site.name, final_global_model=str(path))


def keep_last_update(site: Site, weights: dict, steps: int, rnd: int | None) -> None:
    """What this site sends this round, before any filter (HE encrypts after): its last local model, and what
    lets anyone holding every site's copy check the aggregate (FedAvg weights = steps)."""
    path = site.app_root / LAST_LOCAL_UPDATE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": to_tensor_dict(weights), "steps": steps, "round": rnd}, tmp)
    tmp.replace(path)


def main() -> None:
    args = parse_args()
    flare.init()
    site = open_site(args)
    try:
        while flare.is_running():
            model = flare.receive()
            if model is None:
                break
            if flare.is_train():
                flare.send(train(site, model, args.local_epochs))
            elif flare.is_evaluate():
                flare.send(validate(site, model))
            elif flare.is_submit_model():
                flare.send(FLModel(params=site.runner.best_local_weights()))
    finally:
        site.sender.shutdown()


if __name__ == "__main__":
    main()
