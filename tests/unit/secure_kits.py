"""Fake provisioned kits for the secure tests: the files read_kits() looks at, as nvflare provision lays them out."""

from __future__ import annotations

import json
from pathlib import Path

from spleen_tools.procs import free_port


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
    return root
