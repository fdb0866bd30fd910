"""One port plan (``diffmesh.ports``): compose.yaml, the Dockerfiles and the address defaults follow it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from diffmesh import ports
from diffmesh_router.settings import RouterSettings
from diffmesh_worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]

# compose service / Dockerfile folder -> (the service's port variable, its port in the plan)
PLAN = {
    "router": ("DIFFMESH_ROUTER_PORT", ports.ROUTER_PORT),
    "cache-coordinator": ("DIFFMESH_COORDINATOR_PORT", ports.COORDINATOR_PORT),
    "instance-manager": ("DIFFMESH_IM_PORT", ports.INSTANCE_MANAGER_PORT),
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def _planned(name: str) -> tuple[str, int]:
    if name in PLAN:
        return PLAN[name]
    m = re.fullmatch(r"worker-(\d+)", name)
    assert m, f"compose service {name} has no place in the port plan"
    return "DIFFMESH_WORKER_PORT", ports.worker_port(int(m.group(1)) - 1)


def test_the_plan_is_four_distinct_consecutive_ports() -> None:
    planned = [ports.ROUTER_PORT, ports.COORDINATOR_PORT, ports.INSTANCE_MANAGER_PORT, ports.WORKER_PORT_BASE]
    assert planned == list(range(planned[0], planned[0] + 4))
    assert ports.worker_port(1) == ports.WORKER_PORT_BASE + 1
    with pytest.raises(ValueError):
        ports.worker_port(-1)


def test_compose_ports_follow_the_plan(compose: dict[str, Any]) -> None:
    seen = []
    for name, svc in compose["services"].items():
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        if not any(k.startswith("DIFFMESH_") and k.endswith("_PORT") for k in env):
            continue  # redis, jaeger, demo-models
        variable, port = _planned(name)
        assert env[variable] == str(port), f"{name}: {variable}={env[variable]}, the plan says {port}"
        assert svc["ports"] == [f"{port}:{port}"], f"{name}: published {svc['ports']}, the plan says {port}"
        seen.append(name)
    assert {"router", "cache-coordinator", "instance-manager", "worker-1"} <= set(seen)


def test_compose_addresses_follow_the_plan(compose: dict[str, Any]) -> None:
    expected = {
        "_COORDINATOR": f"cache-coordinator:{ports.COORDINATOR_PORT}",
        "_INSTANCE_MANAGER": f"instance-manager:{ports.INSTANCE_MANAGER_PORT}",
    }
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            for suffix, address in expected.items():
                if key.startswith("DIFFMESH_") and key.endswith(suffix):
                    assert value == address, f"{name}.{key}={value}, the plan says {address}"


@pytest.mark.parametrize(
    ("folder", "variable", "port"),
    [(folder, variable, port) for folder, (variable, port) in PLAN.items()]
    + [("worker", "DIFFMESH_WORKER_PORT", ports.WORKER_PORT_BASE)],
)
def test_dockerfiles_follow_the_plan(folder: str, variable: str, port: int) -> None:
    text = (REPO / "services" / folder / "Dockerfile").read_text()
    assert re.search(rf"^ENV .*\b{variable}={port}\b", text, re.M), f"{folder}/Dockerfile: ENV {variable} is not {port}"
    assert re.search(rf"^EXPOSE {port}$", text, re.M), f"{folder}/Dockerfile: EXPOSE is not {port}"
    assert f'"127.0.0.1:{port}"' in text, f"{folder}/Dockerfile: the healthcheck does not probe {port}"


def test_address_defaults_follow_the_plan() -> None:
    assert RouterSettings.model_fields["coordinator"].default == f"127.0.0.1:{ports.COORDINATOR_PORT}"
    assert WorkerSettings.model_fields["instance_manager"].default == f"127.0.0.1:{ports.INSTANCE_MANAGER_PORT}"


def test_readme_states_the_plan() -> None:
    text = " ".join((REPO / "README.md").read_text().split())
    plan = (
        f"router {ports.ROUTER_PORT}, coordinator {ports.COORDINATOR_PORT}, instance manager "
        f"{ports.INSTANCE_MANAGER_PORT}, a node's workers {ports.WORKER_PORT_BASE}, {ports.WORKER_PORT_BASE + 1}"
    )
    assert plan in text
