"""The provisioned secure workspace: provisioning with real ``nvflare provision``, reading kits, server storage."""

from __future__ import annotations

import json

import pytest

from spleen_tools.paths import SECURE_PROJECT_YML
from spleen_tools.systems.secure_workspace import NotProvisionedError, isolate_server_storage, provision, read_kits


def test_empty_folder_is_not_provisioned(tmp_path):
    with pytest.raises(NotProvisionedError, match="not a provisioned secure workspace"):
        read_kits(tmp_path)


def test_provision_places_the_newest_kits_and_replaces_atomically(tmp_path):
    target = provision(tmp_path, SECURE_PROJECT_YML)
    kits = read_kits(target)
    assert target == tmp_path / "secure_workspace"
    assert list(kits.sites) == ["site-1", "site-2"] and kits.server.name == "localhost"
    assert (kits.fl_port, kits.admin_port, kits.admin_user) == (8102, 8103, "admin@nvidia.com")
    for kit in (kits.server, *kits.sites.values(), kits.admin):
        assert (kit / "startup" / "rootCA.pem").is_file()
    assert (kits.server / "startup" / "server_context.tenseal").is_file()  # HEBuilder: public context only
    assert (kits.sites["site-1"] / "startup" / "client_context.tenseal").is_file()
    (target / "marker").write_text("old")
    provision(tmp_path, SECURE_PROJECT_YML)
    assert not (target / "marker").exists()
    newest = tmp_path / "workspace" / "secure_project" / "prod_01"
    crt = "localhost/startup/server.crt"
    assert (target / crt).read_bytes() == (newest / crt).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secure_workspace", "workspace"], "no temporary leftovers"


def test_server_storage_moves_out_of_the_shared_tmp(tmp_path):
    """NVFlare's default job store /tmp/nvflare/jobs-storage would be shared by every provisioned server."""
    kits = read_kits(provision(tmp_path, SECURE_PROJECT_YML))
    default = kits.server / "local" / "resources.json.default"
    before = default.read_text()
    written = isolate_server_storage(kits.server)
    assert written == kits.server / "local" / "resources.json" and default.read_text() == before
    text = written.read_text()
    assert "/tmp/nvflare" not in text
    assert str(kits.server / "storage" / "jobs") in text and str(kits.server / "storage" / "snapshot") in text
    assert json.loads(text)["class_allow_list"], "provisioning's allow-list is kept"
    written.write_text("{}")  # a file without the shared paths is left alone
    isolate_server_storage(kits.server)
    assert written.read_text() == "{}"


def test_a_fresh_clone_gets_its_workspace_once_and_never_one_named_by_the_user(tmp_path, monkeypatch):
    from spleen_tools.systems import secure_workspace
    from spleen_tools.systems.secure import check_policies

    monkeypatch.delenv(secure_workspace.WORKSPACE_ENV, raising=False)
    monkeypatch.setattr(secure_workspace, "WORKSPACES_DIR", tmp_path / "workspaces")
    said: list[str] = []
    assert secure_workspace.provision_if_missing(said.append)
    kits = read_kits(tmp_path / "workspaces" / "secure_workspace")
    check_policies(kits, 2)  # the kits carry the site policies (allow-list, no BYOC)
    assert len(said) == 1 and "./start_fl_secure.sh provision" in said[0]
    assert not secure_workspace.provision_if_missing(said.append) and len(said) == 1  # there now: kept as it is
    monkeypatch.setenv(secure_workspace.WORKSPACE_ENV, str(tmp_path / "theirs"))
    assert not secure_workspace.provision_if_missing(said.append) and not (tmp_path / "theirs").exists()
