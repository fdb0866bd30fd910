"""compose.yaml and the Dockerfiles, checked statically (no Docker engine exists here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / ".cache" / "compose_spec.json"
SERVICES = {"router": "router", "cache-coordinator": "cache-coordinator", "instance-manager": "instance-manager"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_compose_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} missing: run `make compose-schema` (fetches the schema shipped in the docker-compose wheel)")
    validator = jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_topology_has_redis_jaeger_and_the_four_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "jaeger", "router", "cache-coordinator", "instance-manager"} <= set(services)
    assert any(name.startswith("worker") for name in services)


def test_build_contexts_and_dockerfiles_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build is None:
            assert "image" in svc, f"{name}: neither build nor image"
            continue
        context = REPO / build["context"]
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def _dockerfile_copies(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"^COPY\s+(?!--from)(\S+)\s+\S+", line.strip())
        if m:
            sources.append(m.group(1))
    return sources


@pytest.mark.parametrize("service", ["router", "cache-coordinator", "instance-manager", "worker"])
def test_dockerfile_copies_exist_and_entrypoint_is_the_console_script(service: str) -> None:
    dockerfile = REPO / "services" / service / "Dockerfile"
    for src in _dockerfile_copies(dockerfile):
        assert (REPO / src).exists(), f"{dockerfile}: COPY source {src} missing"
    text = dockerfile.read_text()
    pyproject = (REPO / "services" / service / "pyproject.toml").read_text()
    script = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M)
    assert script and f'{script.group(1)} = "' in pyproject
    assert "diffmesh.healthcheck" in text


@pytest.mark.parametrize("service", ["router", "cache-coordinator"])
def test_torch_free_images_install_no_torch(service: str) -> None:
    text = (REPO / "services" / service / "Dockerfile").read_text()
    assert not re.search(r"pip install[^\n]*torch", text)
    pyproject = (REPO / "services" / service / "pyproject.toml").read_text()
    block = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    requirements = [line.split("#", 1)[0].strip().strip('",') for line in block.splitlines()]
    names = {re.split(r"[<>=~!\[ ]", r, maxsplit=1)[0].lower() for r in requirements if r}
    assert not names & {"torch", "diffusers", "transformers", "peft"}, names


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_ports_match_each_services_port_setting_and_are_unique(compose: dict[str, Any]) -> None:
    published: list[str] = []
    for name, svc in compose["services"].items():
        env = _env(svc)
        port_vars = [v for k, v in env.items() if k.startswith("DIFFMESH_") and k.endswith("_PORT")]
        for mapping in svc.get("ports", []):
            host, _, container = str(mapping).rpartition(":")
            published.append(host)
            if port_vars:
                assert container == port_vars[0], f"{name}: container port {container} != setting {port_vars[0]}"
    assert len(published) == len(set(published)), f"duplicate published ports: {published}"


def test_grpc_services_have_grpc_health_protocol_healthchecks(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        env = _env(svc)
        port = next((v for k, v in env.items() if k.startswith("DIFFMESH_") and k.endswith("_PORT")), None)
        if port is None:
            continue
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "diffmesh.healthcheck"], name
        assert test[4] == f"127.0.0.1:{port}", name


def test_references_resolve(compose: dict[str, Any]) -> None:
    services = compose["services"]
    addresses = {}
    for name, svc in services.items():
        env = _env(svc)
        for key, value in env.items():
            if key.startswith("DIFFMESH_") and key.endswith("_PORT"):
                addresses[name] = value
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for key, value in _env(svc).items():
            if key.endswith(("_COORDINATOR", "_INSTANCE_MANAGER")):
                host, port = value.split(":")
                assert addresses.get(host) == port, f"{name}.{key}={value} does not reach a service"
            if key == "OTEL_EXPORTER_OTLP_ENDPOINT":
                assert value.startswith("http://jaeger:4317")
        ipc = svc.get("ipc", "")
        if ipc.startswith("service:"):
            assert services[ipc.split(":", 1)[1]].get("ipc") == "shareable"
