"""FL methods as small override files of the training jobs: ``jobs/algorithms/<name>.json``, the one registry.

Each file names the method (``name``, ``description``), whether it runs under HE (``under_he``, and why not), the
server components it replaces by id (``server_components``: FedOpt's shareable generator) and the sites' training
script arguments it sets (``site_script_args``: FedProx's ``fedprox_mu``, FedBN's ``fedbn``). ``fedavg`` changes
nothing. The components are NVFlare's own or thin subclasses of them in ``spleen_flare``; every class named here is
on the participants' allow-lists (``spleen_tools.systems.site_policy``).
"""

from __future__ import annotations

import json
from pathlib import Path

from spleen_tools.paths import ALGORITHMS_DIR

DEFAULT_ALGORITHM = "fedavg"


def algorithm_names(folder: Path = ALGORITHMS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.json"))


def load_algorithm(name: str, folder: Path = ALGORITHMS_DIR) -> dict:
    path = Path(folder) / f"{name}.json"
    if name not in algorithm_names(folder):
        raise ValueError(f"unknown algorithm {name!r}: expected one of {', '.join(algorithm_names(folder))}")
    spec = json.loads(path.read_text())
    for key in spec.get("server_components", {}):
        if not isinstance(spec["server_components"][key], dict) or "path" not in spec["server_components"][key]:
            raise ValueError(f"{path}: server_components.{key} needs a path and args")
    return spec


def check_under_he(name: str, he: bool, folder: Path = ALGORITHMS_DIR) -> None:
    """An algorithm that does not run under HE is refused for the HE job, saying why."""
    spec = load_algorithm(name, folder)
    if he and not spec.get("under_he", False):
        why = spec.get("not_under_he_because", "not checked under HE")
        raise ValueError(f"{spec['name']} does not run in the HE job: {why}; use --job local, or another algorithm")


def apply_algorithm(server: dict, name: str, he: bool, folder: Path = ALGORITHMS_DIR) -> dict[str, str]:
    """Replace the server components the algorithm names (in ``server``, the parsed config_fed_server.json) and tag
    its tracking with the method; returns the site script arguments to set."""
    check_under_he(name, he, folder)
    spec = load_algorithm(name, folder)
    components = {c["id"]: c for c in server["components"]}
    for component_id, replacement in spec.get("server_components", {}).items():
        if component_id not in components:
            raise ValueError(f"{name}: the job has no server component {component_id!r} to replace")
        components[component_id]["path"] = replacement["path"]
        components[component_id]["args"] = json.loads(json.dumps(replacement.get("args", {})))
    for component in server["components"]:
        kw_args = component.get("args", {}).get("kw_args")
        if isinstance(kw_args, dict) and "experiment_tags" in kw_args:  # the MLflow receiver (W&B copies its tags)
            kw_args["experiment_tags"]["algorithm"] = spec["name"]
            kw_args["run_name"] = name
    return {key: str(value) for key, value in spec.get("site_script_args", {}).items()}
