"""The HE key fingerprint in the site kits: which provisioning's key pair a site encrypts and decrypts with.

Why: ``nvflare provision`` makes a new key pair every time, with the same CKKS parameters. An update from a
re-provisioned site therefore has the server's parms_id and adds up fine, and every site then decrypts garbage.
The server can name its key (:func:`~spleen_flare.he.keys.key_fingerprint` hashes the relinearization keys its
public context stores), but a site cannot: its context regenerates those keys, randomly, at every load. So
provisioning computes the fingerprint once, from the server's context, and writes it into every site kit as
``he_key_fingerprint.txt`` next to ``client_context.tenseal`` (:class:`HEKeyFingerprintBuilder`, after
``HEBuilder`` and before ``SignatureBuilder`` so that the file is signed with the kit). A site sends it with each
update and checks it on each model it receives; the server compares it with its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import tenseal as ts
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentService
from nvflare.lighter.constants import ProvFileName
from nvflare.lighter.spec import Builder, Project, ProvisionContext

from spleen_flare.he.keys import checked_fingerprint, key_fingerprint

__all__ = [
    "KEY_FINGERPRINT_FILE",
    "HEKeyFingerprintBuilder",
    "key_fingerprint",
    "load_kit_fingerprint",
    "read_fingerprint_file",
    "write_kit_fingerprints",
]

KEY_FINGERPRINT_FILE = "he_key_fingerprint.txt"
_PROVISION_FIX = (
    "provision with spleen_flare.he.fingerprint.HEKeyFingerprintBuilder after HEBuilder and before "
    "SignatureBuilder in project.yml"
)


def write_kit_fingerprints(server_context_path: str | os.PathLike, site_startup_dirs: Iterable) -> str:
    """Write the server context's key fingerprint into each site's startup folder; returns the fingerprint."""
    with open(server_context_path, "rb") as f:
        fingerprint = key_fingerprint(ts.context_from(f.read()))
    for startup in site_startup_dirs:
        if not os.path.isdir(startup):
            raise FileNotFoundError(f"site startup folder {startup} does not exist: provision the kits first")
        with open(os.path.join(startup, KEY_FINGERPRINT_FILE), "w", encoding="ascii") as f:
            f.write(fingerprint + "\n")
    return fingerprint


def read_fingerprint_file(path: str | os.PathLike) -> str:
    """The fingerprint a kit's ``he_key_fingerprint.txt`` holds."""
    with open(path, encoding="ascii", errors="replace") as f:
        return checked_fingerprint(f.read().strip(), str(path))


def load_kit_fingerprint(fl_ctx: FLContext, file_name: str = KEY_FINGERPRINT_FILE) -> str:
    """The fingerprint in this participant's startup kit, read (and, in secure mode, signature-checked) the way
    NVFlare reads the kit's TenSEAL context."""
    data, rc = SecurityContentService.load_content(file_name)
    folder = SecurityContentService.content_folder or "the startup kit"
    if rc == LoadResult.NOT_MANAGED:
        raise ValueError(f"no startup kit to read {file_name} from (HE jobs need a provisioned workspace)")
    if rc == LoadResult.NO_SUCH_CONTENT or not data:
        raise ValueError(
            f"{file_name} is missing from {folder}: {_PROVISION_FIX} (POC: spleen-he-fingerprint <kits folder>)"
        )
    if fl_ctx.get_prop(FLContextKey.SECURE_MODE, True) and rc != LoadResult.OK:
        raise ValueError(
            f"{file_name} in {folder} is not signed with the kit or was changed since ({rc.value}): {_PROVISION_FIX}"
        )
    return checked_fingerprint(data.decode("ascii", errors="replace").strip(), os.path.join(folder, file_name))


class HEKeyFingerprintBuilder(Builder):
    """Provisioning builder: writes ``he_key_fingerprint.txt`` into every client kit.

    List it after ``nvflare.lighter.impl.he.HEBuilder`` (it reads the server kit's ``server_context.tenseal``) and
    before ``nvflare.lighter.impl.signature.SignatureBuilder`` (which then signs the file with the kit). No args.
    """

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        server = project.get_server()
        if server is None:
            raise RuntimeError("HEKeyFingerprintBuilder: the project has no server, so no HE context to name")
        context_path = os.path.join(ctx.get_kit_dir(server), ProvFileName.SERVER_CONTEXT_TENSEAL)
        if not os.path.isfile(context_path):
            raise RuntimeError(f"HEKeyFingerprintBuilder: no {context_path}: list it after HEBuilder in project.yml")
        kits = [ctx.get_kit_dir(client) for client in project.get_clients()]
        for kit in kits:
            if os.path.exists(os.path.join(kit, ProvFileName.SIGNATURE_JSON)):
                raise RuntimeError(
                    f"HEKeyFingerprintBuilder: {kit} is already signed: list it before SignatureBuilder in project.yml"
                )
        write_kit_fingerprints(context_path, kits)
