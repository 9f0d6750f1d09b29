"""The HE key fingerprint in the site kits of a provisioning output that was made without our builder.

``workspaces/secure_project.yml`` lists ``HEKeyFingerprintBuilder``, so provisioned kits carry the file (signed);
``nvflare poc prepare -he`` uses NVFlare's own project, so a POC gets it afterwards from here and the site kits
are signed again with the POC's root key (its ``state/cert.json``), as provisioning signs HE kits: sites read
the file only if its signature holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from nvflare.lighter.utils import sign_folders

from spleen_flare.he.fingerprint import KEY_FINGERPRINT_FILE, write_kit_fingerprints

SIGNATURE_FILE = "signature.json"  # what NVFlare's SignatureBuilder writes into a signed kit folder


def fingerprint_kits(prod_dir: Path) -> tuple[str, list[Path]]:
    """Write the server context's fingerprint into every site kit under ``prod_dir`` and sign the kits again
    where they were signed; returns (fingerprint, files written)."""
    prod_dir = Path(prod_dir)
    servers = sorted(prod_dir.glob("*/startup/server_context.tenseal"))
    sites = sorted(p.parent for p in prod_dir.glob("*/startup/client_context.tenseal"))
    if len(servers) != 1 or not sites:
        raise FileNotFoundError(
            f"{prod_dir}: expected one server kit with server_context.tenseal and site kits with "
            f"client_context.tenseal (found {len(servers)} and {len(sites)}); prepare the POC with -he"
        )
    fingerprint = write_kit_fingerprints(servers[0], sites)
    signed = [s for s in sites if (s / SIGNATURE_FILE).is_file()]
    if signed:
        root_key = _root_private_key(prod_dir.parent / "state" / "cert.json")
        for startup in signed:
            sign_folders(str(startup), root_key, signature_file=SIGNATURE_FILE)
    return fingerprint, [s / KEY_FINGERPRINT_FILE for s in sites]


def _root_private_key(cert_state: Path):
    """The provisioning's root CA key from its state (``nvflare poc prepare`` and ``provision`` keep it there)."""
    try:
        pem = json.loads(cert_state.read_text())["root_pri_key"]
    except (OSError, ValueError, KeyError) as err:
        raise FileNotFoundError(
            f"{cert_state}: no root key to sign the kits again ({err}); use the provisioning's own folder"
        ) from None
    return serialization.load_pem_private_key(pem.encode("ascii"), password=None)


def sign_kits_again(prod_dir: Path) -> list[Path]:
    """Every kit folder under ``prod_dir`` that NVFlare signed (HE kits: ``startup`` and ``local``) signed again with
    the POC's root key, after we changed files in it; returns those folders (none for plain kits)."""
    prod_dir = Path(prod_dir)
    signed = sorted(p.parent for p in prod_dir.glob(f"*/*/{SIGNATURE_FILE}"))
    if signed:
        root_key = _root_private_key(prod_dir.parent / "state" / "cert.json")
        for folder in signed:
            sign_folders(str(folder), root_key, signature_file=SIGNATURE_FILE)
    return signed
