"""Catalog records and the catalog.json manifest: validation, conversion, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffmesh.catalog import (
    ManifestError,
    component_from_dict,
    component_to_dict,
    infer_format,
    load_manifest,
    parse_kind,
    validate_component,
    write_manifest,
)
from diffmesh.errors import InvalidArgument
from diffmesh.v1 import common_pb2

SHA = "ab" * 32


def _lora(**overrides: object) -> common_pb2.Component:
    fields: dict[str, object] = {
        "id": "lora-a",
        "kind": common_pb2.COMPONENT_KIND_LORA,
        "family": "sd15",
        "uri": "file:///models/lora-a.safetensors",
        "bytes": 1234,
        "sha256": SHA,
    }
    fields.update(overrides)
    return common_pb2.Component(**fields)  # type: ignore[arg-type]


def test_valid_record_is_normalised_without_touching_the_input() -> None:
    given = _lora()
    out = validate_component(given)
    assert out.format == common_pb2.ARTIFACT_FORMAT_SAFETENSORS
    assert given.format == common_pb2.ARTIFACT_FORMAT_UNSPECIFIED
    folder = validate_component(_lora(id="base-a", kind=common_pb2.COMPONENT_KIND_BASE, uri="s3://bucket/models/base-a"))
    assert folder.format == common_pb2.ARTIFACT_FORMAT_DIFFUSERS_FOLDER


@pytest.mark.parametrize(
    "uri",
    [
        "file:///m/x.safetensors",
        "https://host/m/x.safetensors?sig=1",
        "http://host:8080/base/",
        "s3://b/k",
        "rel/dir",
        "x.safetensors",
    ],
)
def test_allowed_uris(uri: str) -> None:
    assert validate_component(_lora(uri=uri)).uri == uri


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"id": ""}, "component.id", "required"),
        ({"id": "has space"}, "component.id", "[A-Za-z0-9._:-]"),
        ({"id": "x" * 129}, "component.id", "1-128"),
        ({"kind": common_pb2.COMPONENT_KIND_UNSPECIFIED}, "component.kind", "required"),
        ({"family": ""}, "component.family", "required"),
        ({"uri": ""}, "component.uri", "required"),
        ({"uri": "ftp://host/x.safetensors"}, "component.uri", "scheme 'ftp'"),
        ({"uri": "https:///x.safetensors"}, "component.uri", "no host"),
        ({"uri": "file:///models/x.ckpt"}, "component.uri", "pickle"),
        ({"uri": "https://host/x.bin?download=1"}, "component.uri", "pickle"),
        ({"uri": "models/x.PT"}, "component.uri", "pickle"),
        ({"uri": "file:///a b.safetensors"}, "component.uri", "whitespace"),
        ({"sha256": SHA.upper()}, "component.sha256", "lower-case hex"),
        ({"sha256": "abc"}, "component.sha256", "64"),
        ({"bytes": -1}, "component.bytes", ">= 0"),
        ({"format": common_pb2.ARTIFACT_FORMAT_DIFFUSERS_FOLDER}, "component.format", "DIFFUSERS_FOLDER"),
        ({"kind": common_pb2.COMPONENT_KIND_FUSED}, "component.base_id", "required"),
        ({"base_id": "bad id"}, "component.base_id", "[A-Za-z0-9._:-]"),
    ],
)
def test_bad_records_name_the_field(overrides: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_component(_lora(**overrides))
    assert err.value.field == field
    assert words in err.value.message


def test_dict_round_trip_and_enum_names() -> None:
    record = validate_component(_lora(labels={"owner": "ops", "name": "A"}, format=common_pb2.ARTIFACT_FORMAT_SAFETENSORS))
    as_dict = component_to_dict(record)
    assert as_dict["kind"] == "LORA"
    assert as_dict["format"] == "SAFETENSORS"
    assert component_from_dict(json.loads(json.dumps(as_dict))) == record
    assert (
        parse_kind("k", "lora") == parse_kind("k", "COMPONENT_KIND_LORA") == parse_kind("k", 2) == common_pb2.COMPONENT_KIND_LORA
    )
    assert infer_format("file:///x/y.SAFETENSORS") == common_pb2.ARTIFACT_FORMAT_SAFETENSORS


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"id": "a", "family": "sd15", "uri": "a.safetensors"}, "component.kind"),
        ({"id": "a", "kind": "VAE", "family": "sd15", "uri": "a.safetensors"}, "component.kind"),
        ({"id": "a", "kind": "LORA", "family": "sd15", "uri": "a.safetensors", "size": 3}, "component.size"),
        ({"id": "a", "kind": "LORA", "family": "sd15", "uri": "a.safetensors", "bytes": "3"}, "component.bytes"),
        ({"id": "a", "kind": "LORA", "family": "sd15", "uri": "a.safetensors", "labels": {"n": 1}}, "component.labels"),
        ({"id": 7, "kind": "LORA", "family": "sd15", "uri": "a.safetensors"}, "component.id"),
    ],
)
def test_bad_manifest_entries_name_the_field(entry: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        component_from_dict(entry)
    assert err.value.field == field


def test_manifest_resolves_relative_uris_against_its_folder(tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    doc = {
        "components": [
            {"id": "base-a", "kind": "BASE", "family": "sd15", "uri": "base-a", "bytes": 10, "format": "DIFFUSERS_FOLDER"},
            {"id": "lora-a", "kind": "LORA", "family": "sd15", "uri": "loras/lora-a.safetensors", "sha256": SHA},
            {"id": "remote", "kind": "CONTROLNET", "family": "sd15", "uri": "https://models.example/cn"},
        ]
    }
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(doc))
    base, lora, remote = load_manifest(path)
    assert base.uri == (tmp_path / "base-a").resolve().as_uri()
    assert lora.uri == (tmp_path / "loras" / "lora-a.safetensors").resolve().as_uri()
    assert lora.format == common_pb2.ARTIFACT_FORMAT_SAFETENSORS
    assert remote.uri == "https://models.example/cn"
    assert remote.format == common_pb2.ARTIFACT_FORMAT_DIFFUSERS_FOLDER

    again = write_manifest(tmp_path / "copy.json", [remote, lora, base])
    assert load_manifest(again) == [base, lora, remote]  # written sorted by id


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not valid JSON"),
        ('{"models": []}', '"components" list'),
        ('{"components": [{"id": "a", "kind": "LORA", "family": "sd15", "uri": "a.ckpt"}]}', "components[0].uri"),
        (
            '{"components": [{"id": "a", "kind": "LORA", "family": "sd15", "uri": "a.safetensors"},'
            ' {"id": "a", "kind": "LORA", "family": "sd15", "uri": "b.safetensors"}]}',
            "components[1].id: duplicate id 'a'",
        ),
    ],
)
def test_broken_manifests_say_where(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(text)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert str(path) in str(err.value)
    assert words in str(err.value)


def test_missing_manifest_says_so(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read catalog manifest"):
        load_manifest(tmp_path / "absent.json")
