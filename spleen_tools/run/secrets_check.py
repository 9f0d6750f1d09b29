"""The one command's last check: no kit secret in anything the run wrote (the scan itself: ``secrets_scan``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spleen_tools.run.kit_secrets import known_secrets
from spleen_tools.run.secrets_scan import scan
from spleen_tools.run.settings import ExperimentError

if TYPE_CHECKING:
    from spleen_tools.run.runner import Run


def scan_for_secrets(run: Run) -> dict:
    """Every private key, secret TenSEAL context and admin credential of the kits, looked for in what the run wrote:
    the run directory (MLflow store and artifacts, downloaded job, model bundle) and every participant's logs and
    job folders (the kits' own secret files are skipped). summary.json's ``secrets_scan``."""
    workspace = run.system.workspace
    secrets = known_secrets([workspace])
    report = scan([run.run_dir] + ([] if workspace.is_relative_to(run.run_dir) else [workspace]), secrets)
    return {
        "secrets": len(secrets),
        "files": report.files,
        "bytes": report.bytes,
        "findings": [f"{f.file}: {f.what} ({f.detail})" for f in report.findings],
        "unchecked": [f"{f.file}: {f.what} ({f.detail})" for f in report.unchecked],
    }


def check_no_secret_left(run: Run, scan_info: dict) -> None:
    """A secret found, a file that could not be read in full, or no kit secrets to look for fails the run."""
    if not scan_info["secrets"] or scan_info["findings"] or scan_info["unchecked"]:
        found = [f"secret left behind: {f}" for f in scan_info["findings"]]
        found += [f"could not check for secrets: {f}" for f in scan_info["unchecked"]]
        raise ExperimentError("\n".join(found or [f"{run.system.workspace}: no kit secrets to look for"]))
    run.out(
        f"secrets: none of the kits' {scan_info['secrets']} secrets in {scan_info['files']} files "
        f"({scan_info['bytes'] / 1e6:.0f} MB) of the run directory and the participants' logs and job folders"
    )
