"""Protos follow the project's buf-lint style: package diffmesh.v1, a comment on every
declaration that says something, enum zero values named *_UNSPECIFIED, request/response
messages named after their RPC."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto" / "diffmesh" / "v1"
PROTOS = sorted(PROTO_DIR.glob("*.proto"))

BLOCK = re.compile(r"^\s*(message|enum|service|oneof)\s+(\w+)")
RPC = re.compile(r"^\s*rpc\s+(\w+)\s*\((?:stream\s+)?(\w+)\)\s*returns\s*\((?:stream\s+)?(\w+)\)")
FIELD = re.compile(r"^\s*(?:repeated\s+|optional\s+)?([\w.]+(?:<\s*[\w.]+\s*,\s*[\w.]+\s*>)?)\s+(\w+)\s*=\s*\d+")
ENUM_VALUE = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*\d+")

# Words that carry nothing on their own: a comment made only of these and of the declared
# name's (and type's) words just repeats the declaration.
STOP_WORDS = {"a", "an", "the", "of", "its", "this", "that", "for", "to", "in", "on", "by", "and", "or", "is", "each"}


@dataclass(frozen=True)
class Declaration:
    """One commentable declaration of a proto file."""

    line: int
    text: str
    name: str
    type: str
    comment: str


def _words(text: str) -> set[str]:
    """Lower-case words of ``text``: snake_case, CamelCase and prose split alike, a plural `s` dropped."""
    words = set()
    for token in re.findall(r"[A-Za-z0-9]+", text):
        for word in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", token) or [token]:
            word = word.lower()
            words.add(word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word)
    return words


def is_filler(comment: str, name: str, type_: str = "") -> bool:
    """True when ``comment`` only rewords the declaration (its name, its type, stop words)."""
    said = _words(comment) - STOP_WORDS
    return bool(_words(comment)) and said <= _words(name) | _words(type_.rsplit(".", 1)[-1])


def declarations(proto: Path) -> list[Declaration]:
    """Every message, enum, enum value, service, RPC, oneof and field, with its leading comment."""
    lines = proto.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.strip().startswith("//"):
            continue
        if m := BLOCK.match(line):
            name, type_ = m.group(2), ""
        elif m := RPC.match(line):
            name, type_ = m.group(1), ""
        elif m := FIELD.match(line):
            name, type_ = m.group(2), m.group(1)
        elif m := ENUM_VALUE.match(line):
            name, type_ = m.group(1), ""
        else:
            continue
        j = i
        while j > 0 and lines[j - 1].strip().startswith("//"):
            j -= 1
        comment = " ".join(c.strip().removeprefix("//").strip() for c in lines[j:i])
        out.append(Declaration(i + 1, line.strip(), name, type_, comment))
    return out


def test_there_are_protos() -> None:
    expected = {"common.proto", "router.proto", "coordinator.proto", "instance_manager.proto", "worker.proto"}
    assert {p.name for p in PROTOS} >= expected


@pytest.mark.parametrize(
    ("comment", "name", "type_", "filler"),
    [
        ("Kind.", "kind", "ComponentKind", True),
        ("Component kind.", "kind", "ComponentKind", True),
        ("Shape.", "shape", "int64", True),
        ("Node id.", "node_id", "string", True),
        ("Request of Generate.", "GenerateRequest", "", True),
        ("The result.", "result", "GenerationResult", True),
        ("Tensor dimensions, outermost first; empty for a scalar.", "shape", "int64", False),
        ("Tier the component was in before this Acquire (TIER_HOST means a hit).", "source_tier", "Tier", False),
        ("Bytes of tensor data.", "bytes", "int64", False),
    ],
)
def test_filler_detection(comment: str, name: str, type_: str, filler: bool) -> None:
    assert is_filler(comment, name, type_) is filler


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_package(proto: Path) -> None:
    assert "package diffmesh.v1;" in proto.read_text().splitlines()


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_every_declaration_has_a_comment_that_says_something(proto: Path) -> None:
    decls = declarations(proto)
    assert decls, f"no declarations parsed in {proto.name}"
    missing = [f"{proto.name}:{d.line}: {d.text}" for d in decls if not d.comment]
    assert missing == [], "declarations without a leading comment"
    filler = [f"{proto.name}:{d.line}: {d.text}  // {d.comment}" for d in decls if is_filler(d.comment, d.name, d.type)]
    assert filler == [], "comments that only repeat the declaration: say what it means (units, range, who sets it, empty)"


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
