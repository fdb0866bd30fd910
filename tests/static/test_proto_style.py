"""Protos follow the project's buf-lint style: package diffmesh.v1, comments everywhere,
enum zero values named *_UNSPECIFIED, request/response messages named after their RPC."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto" / "diffmesh" / "v1"
PROTOS = sorted(PROTO_DIR.glob("*.proto"))

DECL = re.compile(r"^\s*(message|enum|service|rpc|oneof)\s+(\w+)|^\s*(repeated\s+|optional\s+)?([\w.<>, ]+)\s+(\w+)\s*=\s*\d+")


def test_there_are_protos() -> None:
    expected = {"common.proto", "router.proto", "coordinator.proto", "instance_manager.proto", "worker.proto"}
    assert {p.name for p in PROTOS} >= expected


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_package_and_comments(proto: Path) -> None:
    lines = proto.read_text().splitlines()
    assert "package diffmesh.v1;" in lines
    missing = []
    for i, line in enumerate(lines):
        if DECL.match(line) and not line.strip().startswith("//"):
            prev = lines[i - 1].strip() if i else ""
            if not prev.startswith("//"):
                missing.append(f"{proto.name}:{i + 1}: {line.strip()}")
    assert missing == [], "declarations without a leading comment"


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_enums_start_with_unspecified_and_are_prefixed(proto: Path) -> None:
    text = proto.read_text()
    for name, body in re.findall(r"enum (\w+) \{(.*?)\n\}", text, re.S):
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper() + "_"
        values = re.findall(r"^\s*(\w+)\s*=\s*(\d+);", body, re.M)
        assert values[0] == (prefix + "UNSPECIFIED", "0"), name
        assert all(v.startswith(prefix) for v, _ in values), name


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_rpc_messages_are_named_after_the_rpc(proto: Path) -> None:
    for rpc, req, resp in re.findall(r"rpc (\w+)\((\w+)\) returns \((?:stream )?(\w+)\)", proto.read_text()):
        assert req == f"{rpc}Request" and resp == f"{rpc}Response", rpc
    for service in re.findall(r"^service (\w+)", proto.read_text(), re.M):
        assert service.endswith("Service")
