"""A trained global model as a MONAI bundle that a site can run, verify and share.

``export_bundle`` copies the repository's bundle (configs, docs, licence), writes the weights as
``models/model.pt`` (a plain state dict: what the bundle's ``evaluate.json`` and ``inference.json`` load),
``models/model.ts`` (TorchScript through MONAI's ``ckpt_export``, configs and metadata embedded) and a
``configs/metadata.json`` with a new version, a changelog line, the measured cross-site Dice and where the model
came from. ``verify_bundle`` runs MONAI's ``verify_metadata`` (offline, with the shipped schema) and
``verify_net_in_out``, and checks that the TorchScript model gives the state dict's output on a test input.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from spleen_tools.job_result import (
    CheckpointError,
    cross_site_by_model,
    model_choice,
    read_checkpoint,
    read_model_history,
)
from spleen_tools.jobs import get_script_args
from spleen_tools.paths import BUNDLE_NAME, BUNDLE_SRC, BUNDLES_DIR
from spleen_tools.run.summary import SUMMARY_FILE, RunSummary

EXPORT_DIR = "model_bundle"  # in a run directory: model_bundle/spleen_ct_segmentation/
SCHEMA = BUNDLES_DIR / "metadata_schema.json"
MODEL_KINDS = {"final": "FL_global_model.pt", "best": "best_FL_global_model.pt"}  # NVFlare's names, app_server/
TS_TOLERANCE = 1e-4


@contextlib.contextmanager
def quiet_monai() -> Iterator[None]:
    """MONAI's bundle scripts log every argument at INFO; a run's output keeps only our one line."""
    loggers = [logging.getLogger(name) for name in ("monai.bundle.scripts", "monai.apps")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No hash value provided")  # our own schema file
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class ExportError(Exception):
    """A model that cannot be exported or whose bundle does not verify; the message says which file and why."""


@dataclass(frozen=True)
class ModelSource:
    """The weights to export and where they came from (written into the bundle's metadata)."""

    checkpoint: Path  # NVFlare's PT checkpoint ({"model": state dict, ...}) or a plain state dict
    kind: str = "final"  # "final" or "best" global model
    job_id: str | None = None
    job_name: str | None = None
    rounds: int | None = None
    sites: list[str] = field(default_factory=list)
    dice: dict[str, float] = field(default_factory=dict)  # cross-site Dice of this model on each site's data
    model_round: int | None = None
    bundle: Path = BUNDLE_SRC  # the bundle the sites trained (the job's copy when the job was downloaded)
    train_configs: tuple[str, ...] = ("configs/train.json",)  # as the sites read them, relative to ``bundle``


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The network weights of an NVFlare PT checkpoint or a plain state dict (weights only: see read_checkpoint)."""
    try:
        return read_checkpoint(checkpoint)
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def source_from_job(job_dir: Path, kind: str = "final") -> ModelSource:
    """The final or best global model of a downloaded job (``nvflare job download`` / the one command's
    ``job_result/<job_id>/``), with its job id, rounds, sites and cross-site Dice."""
    found = sorted(Path(job_dir).rglob(f"app_server/{MODEL_KINDS[kind]}"))
    if not found:
        raise ExportError(
            f"no {MODEL_KINDS[kind]} under {job_dir}: give a downloaded job folder (with workspace/app_server/) or a"
            " run directory of ./run_experiment.sh"
        )
    metas = sorted(Path(job_dir).rglob("meta.json"), key=lambda m: len(m.parts))  # the job's, not its app's
    meta = json.loads(metas[0].read_text()) if metas else {}
    history = read_model_history(Path(job_dir)) or []
    chosen = model_choice(history).get(f"{kind}_model") or {}
    rounds = [e["round"] for e in history if isinstance(e.get("round"), int)]
    results = sorted(Path(job_dir).rglob("cross_val_results.json"))
    table = cross_site_by_model(json.loads(results[0].read_text())) if results else {}
    dice = table.get(f"SRV_{MODEL_KINDS[kind]}", {})
    bundle, train_configs = trained_bundle(Path(job_dir))
    return ModelSource(
        checkpoint=found[0],
        kind=kind,
        job_id=meta.get("job_id"),
        job_name=meta.get("name"),
        rounds=max(rounds) + 1 if rounds else None,
        sites=sorted(dice),
        dice=dice,
        model_round=chosen.get("round"),
        bundle=bundle,
        train_configs=train_configs,
    )


def trained_bundle(job_dir: Path) -> tuple[Path, tuple[str, ...]]:
    """The bundle and training config files of a downloaded job's client app (``--bundle``, ``--config_files``);
    the repository's bundle and its train.json where the download holds no job definition."""
    for client in sorted(job_dir.glob("job/*/app/config/config_fed_client.json")):
        args = get_script_args(client.parents[2])
        bundle = client.parents[1] / args.get("bundle", f"config/{BUNDLE_NAME}")
        files = tuple(f.strip() for f in args.get("config_files", "configs/train.json").split(",") if f.strip())
        if (bundle / "configs" / "inference.json").is_file():
            return bundle, files
    return BUNDLE_SRC, ("configs/train.json",)


def training_config(source: ModelSource) -> tuple[list[int], dict]:
    """The patch size the sites trained and validated with (``roi_size``) and the network they trained
    (``network_def``), after their overrides (DP: instance norm instead of BatchNorm)."""
    parser = ConfigParser()
    parser.read_config([str(source.bundle / f) for f in source.train_configs])
    return [int(n) for n in parser.get_parsed_content("roi_size")], parser.get("network_def")


def match_training(configs: Path, roi: list[int], network_def: dict | None = None) -> str | None:
    """Set the exported inference ROI (and the metadata's input shape) and network to the trained ones; say what
    changed, or None."""
    inference_path, meta_path = configs / "inference.json", configs / "metadata.json"
    inference = json.loads(inference_path.read_text())
    notes = []
    if network_def is not None and inference.get("network_def") != network_def:
        inference["network_def"] = network_def
        notes.append(f"network as trained (norm {network_def.get('norm')})")
    if inference.get("roi_size") != roi:
        inference["roi_size"] = roi
        meta = json.loads(meta_path.read_text())
        meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = roi
        meta_path.write_text(json.dumps(meta, indent=4) + "\n")
        notes.append(f"inference ROI {'x'.join(map(str, roi))} as trained")
    if not notes:
        return None
    inference_path.write_text(json.dumps(inference, indent=4) + "\n")
    return "; ".join(notes)


def find_job(path: Path) -> Path:
    """The downloaded job of a run directory (its ``summary.json`` names it), or a downloaded job folder itself
    (``workspace/app_server/`` in it, or in its one subfolder: ``job_result/`` holds ``<job_id>/``)."""
    if (path / SUMMARY_FILE).is_file():
        path = Path(RunSummary.load(path).paths["job_result"])
    jobs = [
        p
        for p in (path, *(sorted(path.iterdir()) if path.is_dir() else []))
        if (p / "workspace" / "app_server").is_dir()
    ]
    if len(jobs) != 1:
        found = "no" if not jobs else f"{len(jobs)}"
        raise ExportError(
            f"{path}: {found} downloaded job(s) here; give a run directory of ./run_experiment.sh or one downloaded job"
            " folder (with workspace/app_server/)"
        )
    return jobs[0]


def next_version(version: str) -> str:
    major, minor, patch = (int(part) for part in version.split("."))
    return f"{major}.{minor}.{patch + 1}"


def write_metadata(meta_path: Path, source: ModelSource, today: str, note: str | None = None) -> dict:
    """New version, changelog line, measured Dice and provenance in the exported bundle's metadata.json."""
    meta = json.loads(meta_path.read_text())
    version = next_version(meta["version"])
    rounds = f"{source.rounds} rounds" if source.rounds is not None else "federated training"
    picked = f", round {source.model_round}" if source.model_round is not None else ""
    meta["version"] = version
    meta["changelog"] = {
        version: f"{source.kind} global model of NVFlare job {source.job_id} ({rounds}, sites "
        f"{', '.join(source.sites) or 'unknown'}{picked}), exported {today}" + (f"; {note}" if note else ""),
        **meta["changelog"],
    }
    if source.dice:
        meta["eval_metrics"] = {"mean_dice": round(sum(source.dice.values()) / len(source.dice), 4)}
    meta["federated_training"] = {
        "job_id": source.job_id,
        "job_name": source.job_name,
        "rounds": source.rounds,
        "sites": source.sites,
        "model": source.kind,
        "model_round": source.model_round,
        "cross_site_dice": {site: round(d, 4) for site, d in source.dice.items()},
        "exported": today,
        "checkpoint": str(source.checkpoint),
    }
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")
    return meta


def export_bundle(source: ModelSource, out_dir: Path) -> Path:
    """Write ``out_dir/spleen_ct_segmentation/`` (configs, docs, models/model.pt and model.ts); return it."""
    weights = read_state_dict(source.checkpoint)
    bundle = out_dir / BUNDLE_NAME
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(source.bundle, bundle, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    models = bundle / "models"
    models.mkdir()
    torch.save(weights, models / "model.pt")
    configs = bundle / "configs"
    note = match_training(configs, *training_config(source))
    write_metadata(configs / "metadata.json", source, dt.date.today().isoformat(), note)
    with quiet_monai():
        ckpt_export(
            net_id="network_def",
            filepath=str(models / "model.ts"),
            ckpt_file=str(models / "model.pt"),
            meta_file=str(configs / "metadata.json"),
            config_file=str(configs / "inference.json"),
        )
    return bundle


def verify_bundle(bundle: Path) -> dict:
    """MONAI's metadata and network checks, and TorchScript == state dict on a test input; raises ExportError."""
    configs = bundle / "configs"
    meta_file, inference = str(configs / "metadata.json"), str(configs / "inference.json")
    with tempfile.TemporaryDirectory() as tmp, quiet_monai():
        schema = Path(tmp) / SCHEMA.name  # verify_metadata would download the schema URL; give it ours
        shutil.copy(SCHEMA, schema)
        verify_metadata(meta_file=meta_file, filepath=str(schema))
        verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=inference, device="cpu")
    parser = ConfigParser()
    parser.read_config(inference)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu")
    meta = json.loads(Path(meta_file).read_text())
    shape = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    x = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    network.eval()
    scripted.eval()
    with torch.no_grad():
        diff = float((network(x) - scripted(x)).abs().max())
    if diff > TS_TOLERANCE:
        raise ExportError(f"{bundle}/models/model.ts differs from model.pt by {diff:.2e} on a test input")
    return {"version": meta["version"], "torchscript_max_abs_diff": diff}
