"""Fake provisioned kits for the secure tests: the files read_kits() looks at, as nvflare provision lays them out."""

from __future__ import annotations

import json
from pathlib import Path

from spleen_tools.procs import free_port
from spleen_tools.systems.site_policy import write_server_policy, write_site_policy


def fake_kits(root: Path, sites: int = 2, ports: tuple[int, int] | None = None) -> Path:
    """The files read_kits() looks at, as nvflare provision lays them out (no certificates: nothing starts)."""
    fl_port, admin_port = ports or (free_port(), free_port())
    server = {"servers": [{"service": {"target": f"localhost:{fl_port}"}, "admin_port": admin_port}]}
    files = {
        "localhost/startup/fed_server.json": server,
        "admin@nvidia.com/startup/fed_admin.json": {"admin": {"username": "admin@nvidia.com"}},
        **{f"site-{i}/startup/fed_client.json": {} for i in range(1, sites + 1)},
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(content))
    for kit in ("localhost", *(f"site-{i}" for i in range(1, sites + 1))):  # as SitePolicyBuilder leaves them
        (root / kit / "local").mkdir(parents=True, exist_ok=True)
        (root / kit / "local" / "resources.json.default").write_text(json.dumps({"format_version": 2}))
        (write_server_policy if kit == "localhost" else write_site_policy)(root / kit)
    return root


PROJECT = "secure_project"
PARTICIPANTS = {"localhost": "server", "site-1": "client", "site-2": "client", "admin@nvidia.com": "client"}


def provisioned_kits(ws: Path) -> Path:
    """<ws>/secure_project/{prod_00/<participant>/startup, state/cert.json} with real keys, certificates and HE
    contexts, as nvflare provision writes them; returns ws."""
    from nvflare.lighter.impl.he import HEBuilder
    from nvflare.lighter.utils import Identity, generate_cert, generate_keys, serialize_cert, serialize_pri_key

    root_key, root_pub = generate_keys()
    root = Identity(PROJECT)
    root_pem = serialize_cert(generate_cert(root, root, root_key, root_pub, ca=True))
    state = {"root_cert": root_pem.decode(), "root_pri_key": serialize_pri_key(root_key).decode()}
    he = HEBuilder()
    he.initialize(None, None)
    for name, base in PARTICIPANTS.items():
        startup = ws / PROJECT / "prod_00" / name / "startup"
        startup.mkdir(parents=True)
        key, pub = generate_keys()
        cert = serialize_cert(generate_cert(Identity(name, "nvidia"), root, root_key, pub))
        (startup / f"{base}.key").write_bytes(serialize_pri_key(key))
        (startup / f"{base}.crt").write_bytes(cert)
        (startup / "rootCA.pem").write_bytes(root_pem)
        (startup / "signature.json").write_text(json.dumps({f"{base}.crt": "c2lnbmF0dXJl"}))
        state[name] = {"cert": cert.decode(), "pri_key": serialize_pri_key(key).decode()}
        if name == "localhost":
            (startup / "server_context.tenseal").write_bytes(he.get_serialized_context())
        elif name.startswith("site-"):
            (startup / "client_context.tenseal").write_bytes(he.get_serialized_context(is_client=True))
    (ws / PROJECT / "state").mkdir()
    (ws / PROJECT / "state" / "cert.json").write_text(json.dumps(state))
    return ws
