"""The HE key fingerprint put into kits provisioned without our builder (``nvflare poc prepare -he``): written into
every site kit and signed again with the provisioning's root key, so that a site in secure mode reads it; a file
changed afterwards fails the signature. Real NVFlare builders (HE, certificates, signatures) on a real
``ProvisionContext``, laid out as provisioning does (``state/cert.json`` beside the kits)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tenseal as ts
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentManager
from nvflare.lighter.ctx import ProvisionContext
from nvflare.lighter.entity import Participant, Project
from nvflare.lighter.impl.cert import CertBuilder
from nvflare.lighter.impl.he import HEBuilder
from nvflare.lighter.impl.signature import SignatureBuilder

from spleen_flare.he.fingerprint import KEY_FINGERPRINT_FILE, read_fingerprint_file
from spleen_flare.he.packing import key_fingerprint
from spleen_tools.cli.he_fingerprint import main as he_fingerprint_main
from spleen_tools.systems.he_kits import fingerprint_kits


def _poc_like_kits(root: Path) -> Path:
    """A server and two sites provisioned by NVFlare's HE, certificate and signature builders (no fingerprint)."""
    participants = [Participant("server", "server", "org")] + [
        Participant("client", s, "org") for s in ("site-1", "site-2")
    ]
    project = Project("example_project", "POC-like kits", participants=participants)
    ctx = ProvisionContext(str(root), project)
    for participant in participants:
        os.makedirs(ctx.get_kit_dir(participant))
        os.makedirs(ctx.get_local_dir(participant))
    builders = [HEBuilder(), CertBuilder(), SignatureBuilder()]
    for step in ("initialize", "build", "finalize"):
        for builder in builders:
            getattr(builder, step)(project, ctx)
    return Path(ctx.get_kit_dir(participants[1])).parents[1]  # the folder holding the participants' kits


def _load(startup: Path, name: str) -> LoadResult:
    return SecurityContentManager(str(startup)).load_content(name)[1]  # what a site's NVFlare checks


def test_poc_kits_get_the_servers_fingerprint_signed(tmp_path, capsys):
    prod = _poc_like_kits(tmp_path / "poc")
    server_ctx = ts.context_from((prod / "server" / "startup" / "server_context.tenseal").read_bytes())
    fingerprint, files = fingerprint_kits(prod)
    assert fingerprint == key_fingerprint(server_ctx)
    assert files == [prod / s / "startup" / KEY_FINGERPRINT_FILE for s in ("site-1", "site-2")]
    for file in files:
        assert read_fingerprint_file(file) == fingerprint
        assert _load(file.parent, KEY_FINGERPRINT_FILE) == LoadResult.OK  # signed with the kit
        assert _load(file.parent, "client_context.tenseal") == LoadResult.OK  # the rest still verifies
    files[0].write_text("0" * 64 + "\n")  # changed after signing
    assert _load(files[0].parent, KEY_FINGERPRINT_FILE) != LoadResult.OK

    assert he_fingerprint_main([str(prod)]) == 0  # the command: written and signed again
    assert "written to 2 site kits" in capsys.readouterr().out
    assert _load(files[0].parent, KEY_FINGERPRINT_FILE) == LoadResult.OK


def test_kits_without_he_are_refused_with_the_fix(tmp_path, capsys):
    (tmp_path / "server" / "startup").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="prepare the POC with -he"):
        fingerprint_kits(tmp_path)
    assert he_fingerprint_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: expected one server kit")
