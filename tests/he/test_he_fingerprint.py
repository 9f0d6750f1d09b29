"""The HE key fingerprint: stable for one provisioning, different for another, written into the site kits by the
provisioning builder and read back by the site filters at START_RUN the way NVFlare reads the kit's context.

Provisioning runs NVFlare's real builders (``HEBuilder``, ``HEKeyFingerprintBuilder``, ``CertBuilder``,
``SignatureBuilder``, in project.yml's order) on a real ``ProvisionContext`` (kit folders only; nothing starts).
The kit is read, signatures checked, through NVFlare's ``SecurityContentService``, pointed at the site's startup
folder for the test only.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.sec.security_content_service import SecurityContentManager, SecurityContentService
from nvflare.lighter.ctx import ProvisionContext
from nvflare.lighter.entity import Participant, Project
from nvflare.lighter.impl.cert import CertBuilder
from nvflare.lighter.impl.he import HEBuilder
from nvflare.lighter.impl.signature import SignatureBuilder

from spleen_flare.he.filters import PackedHEDecryptor, PackedHEEncryptor
from spleen_flare.he.fingerprint import (
    KEY_FINGERPRINT_FILE,
    HEKeyFingerprintBuilder,
    load_kit_fingerprint,
    read_fingerprint_file,
    write_kit_fingerprints,
)
from spleen_flare.he.keys import key_fingerprint
from spleen_flare.he.packing import HE_META_KEY, PackedSum

SITES = ("site-1", "site-2")


def test_fingerprint_is_stable_per_provisioning_and_differs_between_them(contexts, key, foreign) -> None:
    serialized = contexts[1].serialize(save_public_key=False, save_secret_key=False, save_relin_keys=True)
    assert key_fingerprint(ts.context_from(serialized)) == key_fingerprint(ts.context_from(serialized)) == key
    assert foreign[2] != key and len(key) == 64
    with pytest.raises(ValueError, match="server_context.tenseal"):
        key_fingerprint(contexts[0])  # a site's context regenerates its relinearization keys at load


def _provision(root, builders: list) -> tuple[Project, ProvisionContext]:
    """Run ``builders`` (initialize, then build, as ``nvflare provision`` does) for a server and two sites."""
    participants = [Participant("server", "server1", "org")] + [Participant("client", s, "org") for s in SITES]
    project = Project("he_project", "HE kits", participants=participants)
    ctx = ProvisionContext(str(root), project)
    for participant in participants:  # what WorkspaceBuilder makes first
        os.makedirs(ctx.get_kit_dir(participant))
        os.makedirs(ctx.get_local_dir(participant))
    for builder in builders:
        builder.initialize(project, ctx)
    for builder in builders:
        builder.build(project, ctx)
    return project, ctx


def test_builder_writes_the_servers_fingerprint_into_every_site_kit(tmp_path) -> None:
    project, ctx = _provision(tmp_path / "ok", [HEBuilder(), HEKeyFingerprintBuilder()])
    server_kit = ctx.get_kit_dir(project.get_server())
    with open(os.path.join(server_kit, "server_context.tenseal"), "rb") as f:
        expected = key_fingerprint(ts.context_from(f.read()))
    for client in project.get_clients():
        kit = ctx.get_kit_dir(client)
        assert os.path.isfile(os.path.join(kit, "client_context.tenseal"))
        assert read_fingerprint_file(os.path.join(kit, KEY_FINGERPRINT_FILE)) == expected
    assert not os.path.exists(os.path.join(server_kit, KEY_FINGERPRINT_FILE))  # the server computes its own
    with pytest.raises(FileNotFoundError, match="provision the kits first"):
        write_kit_fingerprints(os.path.join(server_kit, "server_context.tenseal"), [tmp_path / "nowhere"])
    # listed in the wrong place in project.yml: one clear error each
    with pytest.raises(RuntimeError, match="after HEBuilder"):
        _provision(tmp_path / "early", [HEKeyFingerprintBuilder(), HEBuilder()])
    with pytest.raises(RuntimeError, match="before SignatureBuilder"):  # the file would go unsigned
        _provision(tmp_path / "late", [HEBuilder(), CertBuilder(), SignatureBuilder(), HEKeyFingerprintBuilder()])


@pytest.fixture
def site_kit(tmp_path, monkeypatch) -> tuple[str, str]:
    """A signed site-1 kit that NVFlare's SecurityContentService serves (as in a running client)."""
    builders = [HEBuilder(), HEKeyFingerprintBuilder(), CertBuilder(), SignatureBuilder()]
    project, ctx = _provision(tmp_path, builders)
    kit = ctx.get_kit_dir(project.get_clients()[0])
    monkeypatch.setattr(SecurityContentService, "security_content_manager", SecurityContentManager(kit))
    monkeypatch.setattr(SecurityContentService, "content_folder", kit)
    return kit, os.path.join(ctx.get_kit_dir(project.get_server()), "server_context.tenseal")


def _fl_ctx(secure: bool = True) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.SECURE_MODE, secure, private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
    fl_ctx.set_prop(FLContextKey.TASK_NAME, "train", private=True, sticky=False)
    return fl_ctx


def test_site_filters_read_the_kit_fingerprint_at_start_run(site_kit) -> None:
    kit, server_context_path = site_kit
    with open(server_context_path, "rb") as f:
        server_ctx = ts.context_from(f.read())
    enc, dec = PackedHEEncryptor(), PackedHEDecryptor()
    for site_filter in (enc, dec):
        site_filter.handle_event(EventType.START_RUN, _fl_ctx())
        assert site_filter.key_fingerprint == key_fingerprint(server_ctx)
    weights = {"w": np.linspace(-1, 1, 100, dtype=np.float32)}
    sh = DXO(DataKind.WEIGHTS, dict(weights), {MetaKey.NUM_STEPS_CURRENT_ROUND: 2}).to_shareable()
    he_meta = from_shareable(enc.process(sh, _fl_ctx())).meta[HE_META_KEY]
    assert he_meta["key"] == key_fingerprint(server_ctx) and he_meta["max_clients"] == enc.max_clients
    PackedSum(server_ctx).add(from_shareable(sh).data, he_meta)  # the server agrees: the same provisioning
    got = from_shareable(dec.process(sh, _fl_ctx())).data
    np.testing.assert_allclose(got["w"], weights["w"], atol=1e-6)


def test_a_kit_without_a_usable_fingerprint_is_one_clear_error(site_kit, foreign) -> None:
    kit, _ = site_kit
    with open(os.path.join(kit, KEY_FINGERPRINT_FILE), "w") as f:
        f.write(foreign[2] + "\n")  # another provisioning's fingerprint, written after signing
    with pytest.raises(ValueError, match="not signed with the kit .*before SignatureBuilder"):
        load_kit_fingerprint(_fl_ctx(secure=True))  # secure mode: the file must be signed like the context
    assert load_kit_fingerprint(_fl_ctx(secure=False)) == foreign[2]  # POC (not secure): unsigned is read
    with open(os.path.join(kit, KEY_FINGERPRINT_FILE), "w") as f:
        f.write("not a fingerprint\n")
    with pytest.raises(ValueError, match=f"{KEY_FINGERPRINT_FILE} is not an HE key fingerprint"):
        load_kit_fingerprint(_fl_ctx(secure=False))
    os.remove(os.path.join(kit, KEY_FINGERPRINT_FILE))
    enc = PackedHEEncryptor()
    with pytest.raises(ValueError, match=f"{KEY_FINGERPRINT_FILE} is missing from .*HEKeyFingerprintBuilder"):
        enc.load_kit(_fl_ctx(secure=False))
