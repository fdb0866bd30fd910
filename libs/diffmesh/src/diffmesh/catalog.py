"""Catalog records: validation and the ``catalog.json`` manifest (torch-free).

A catalog record (:class:`diffmesh.v1.common_pb2.Component`) names one loadable unit.
:func:`validate_component` checks a record and returns a normalised copy (format inferred
from the uri when unspecified); every problem is an
:class:`~diffmesh.errors.InvalidArgument` naming the offending field, so the coordinator
can hand it straight to the client.

The manifest is ``{"components": [{"id", "kind", "family", "uri", "bytes", "sha256",
"format", "base_id", "labels"}, ...]}``. ``kind`` and ``format`` are the enum names with or
without their prefix (``"LORA"`` or ``"COMPONENT_KIND_LORA"``); a ``uri`` without a scheme is
a path relative to the manifest's folder and becomes an absolute ``file://`` uri.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from diffmesh.artifacts import TENSOR_SUFFIX, is_pickle_path
from diffmesh.errors import InvalidArgument
from diffmesh.v1 import common_pb2

ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
"""Charset and length of component ids (also used for node and worker ids)."""
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ALLOWED_SCHEMES = ("file", "http", "https", "s3")
MAX_URI_CHARS = 4096
MAX_LABELS = 64
MAX_LABEL_CHARS = 1024

_KIND_PREFIX = "COMPONENT_KIND_"
_FORMAT_PREFIX = "ARTIFACT_FORMAT_"


class ManifestError(ValueError):
    """A catalog manifest cannot be read or holds an invalid record; the message says where."""


def check_id(field: str, value: str) -> str:
    """Returns ``value`` when it is a valid id, else raises InvalidArgument naming ``field``."""
    if not ID_RE.match(value):
        raise InvalidArgument(field, f"{value!r} must be 1-128 characters of [A-Za-z0-9._:-]")
    return value


def kind_name(kind: int) -> str:
    """Short name of a ComponentKind (``BASE``, ``LORA``, ``CONTROLNET``, ``FUSED``); the number for an unknown value.

    The one place kind names are made; services print kinds through it rather than a
    table of their own. :func:`parse_kind` is the way back.
    """
    try:
        return common_pb2.ComponentKind.Name(kind).removeprefix(_KIND_PREFIX)  # type: ignore[arg-type]
    except ValueError:
        return str(kind)


def format_name(fmt: int) -> str:
    """Short name of an ArtifactFormat (``SAFETENSORS``, ``DIFFUSERS_FOLDER``, ...)."""
    return common_pb2.ArtifactFormat.Name(fmt).removeprefix(_FORMAT_PREFIX)  # type: ignore[arg-type]


def parse_kind(field: str, value: object) -> int:
    """ComponentKind from a short or full enum name (case-insensitive) or its number."""
    return _parse_enum(field, value, common_pb2.ComponentKind, _KIND_PREFIX)


def parse_format(field: str, value: object) -> int:
    """ArtifactFormat from a short or full enum name (case-insensitive) or its number."""
    return _parse_enum(field, value, common_pb2.ArtifactFormat, _FORMAT_PREFIX)


def _parse_enum(field: str, value: object, enum: Any, prefix: str) -> int:
    names = [n.removeprefix(prefix) for n in enum.keys()]
    if isinstance(value, bool):
        raise InvalidArgument(field, f"expected one of {names}, got {value!r}")
    if isinstance(value, int):
        if value in enum.values():
            return value
    elif isinstance(value, str):
        name = value.strip().upper()
        full = name if name.startswith(prefix) else prefix + name
        if full in enum.keys():
            return int(enum.Value(full))
    raise InvalidArgument(field, f"expected one of {names}, got {value!r}")


def uri_path(uri: str) -> str:
    """The path part of a uri (the whole string for a plain path), percent-decoded."""
    parts = urlsplit(uri)
    return unquote(parts.path) if parts.scheme else uri


def infer_format(uri: str) -> int:
    """``SAFETENSORS`` for a ``.safetensors`` uri, else ``DIFFUSERS_FOLDER``."""
    if uri_path(uri).lower().rstrip("/").endswith(TENSOR_SUFFIX):
        return common_pb2.ARTIFACT_FORMAT_SAFETENSORS
    return common_pb2.ARTIFACT_FORMAT_DIFFUSERS_FOLDER


def check_uri(field: str, uri: str) -> str:
    """Checks scheme, shape and format of an artifact uri; refuses pickle checkpoints."""
    if not uri:
        raise InvalidArgument(field, "is required")
    if len(uri) > MAX_URI_CHARS:
        raise InvalidArgument(field, f"longer than {MAX_URI_CHARS} characters")
    if any(ch.isspace() or ord(ch) < 32 for ch in uri):
        raise InvalidArgument(field, f"{uri!r} contains whitespace or control characters")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    # A one-letter "scheme" is a Windows drive letter; treat it as an (unsupported) path.
    if scheme and (len(scheme) > 1 or "://" in uri):
        if scheme not in ALLOWED_SCHEMES:
            raise InvalidArgument(field, f"scheme {scheme!r} of {uri!r} is not one of {list(ALLOWED_SCHEMES)}")
        if scheme in ("http", "https", "s3") and not parts.netloc:
            raise InvalidArgument(field, f"{uri!r} has no host (bucket)")
        if not parts.path.strip("/"):
            raise InvalidArgument(field, f"{uri!r} has no path")
    path = uri_path(uri)
    if is_pickle_path(path) or is_pickle_path(uri):
        raise InvalidArgument(
            field, f"{uri!r} is a pickle checkpoint (.ckpt/.bin/.pt/...), which can execute code; use safetensors"
        )
    return uri


def validate_component(component: common_pb2.Component, field: str = "component") -> common_pb2.Component:
    """Validates a catalog record and returns a normalised copy (format inferred when unspecified).

    Raises :class:`~diffmesh.errors.InvalidArgument` naming the field (``component.uri``...).
    """
    out = common_pb2.Component()
    out.CopyFrom(component)
    if not out.id:
        raise InvalidArgument(f"{field}.id", "is required")
    check_id(f"{field}.id", out.id)
    if out.kind == common_pb2.COMPONENT_KIND_UNSPECIFIED:
        raise InvalidArgument(f"{field}.kind", "is required (BASE, LORA, CONTROLNET or FUSED)")
    if out.kind not in common_pb2.ComponentKind.values():
        raise InvalidArgument(f"{field}.kind", f"unknown value {out.kind}")
    if not out.family:
        raise InvalidArgument(f"{field}.family", "is required (e.g. 'sd15')")
    check_id(f"{field}.family", out.family)
    check_uri(f"{field}.uri", out.uri)
    if out.bytes < 0:
        raise InvalidArgument(f"{field}.bytes", f"must be >= 0, got {out.bytes}")
    if out.sha256 and not SHA256_RE.match(out.sha256):
        raise InvalidArgument(f"{field}.sha256", f"must be 64 lower-case hex characters, got {out.sha256!r}")
    if out.format not in common_pb2.ArtifactFormat.values():
        raise InvalidArgument(f"{field}.format", f"unknown value {out.format}")
    inferred = infer_format(out.uri)
    if out.format == common_pb2.ARTIFACT_FORMAT_UNSPECIFIED:
        out.format = inferred  # type: ignore[assignment]
    elif out.format == common_pb2.ARTIFACT_FORMAT_DIFFUSERS_FOLDER and inferred == common_pb2.ARTIFACT_FORMAT_SAFETENSORS:
        raise InvalidArgument(f"{field}.format", f"DIFFUSERS_FOLDER does not match the file uri {out.uri!r}")
    if out.kind == common_pb2.COMPONENT_KIND_FUSED and not out.base_id:
        raise InvalidArgument(f"{field}.base_id", "is required for FUSED components")
    if out.base_id:
        check_id(f"{field}.base_id", out.base_id)
        if out.base_id == out.id:
            raise InvalidArgument(f"{field}.base_id", "must differ from the component's own id")
    if len(out.labels) > MAX_LABELS:
        raise InvalidArgument(f"{field}.labels", f"at most {MAX_LABELS} labels, got {len(out.labels)}")
    for key, value in out.labels.items():
        if not key or len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
            raise InvalidArgument(
                f"{field}.labels", f"keys must be 1-{MAX_LABEL_CHARS} and values <= {MAX_LABEL_CHARS} characters"
            )
    return out


def component_from_dict(data: Mapping[str, Any], base_dir: Path | None = None, field: str = "component") -> common_pb2.Component:
    """Builds and validates a Component from a manifest entry.

    A ``uri`` without a scheme resolves against ``base_dir`` (when given) to an absolute
    ``file://`` uri. Unknown keys are refused so that typos do not pass silently.
    """
    if not isinstance(data, Mapping):
        raise InvalidArgument(field, f"must be an object, got {type(data).__name__}")
    known = {"id", "kind", "family", "uri", "bytes", "sha256", "format", "base_id", "labels"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidArgument(f"{field}.{unknown[0]}", f"unknown key (known: {sorted(known)})")
    out = common_pb2.Component()
    for key in ("id", "family", "uri", "sha256", "base_id"):
        value = data.get(key, "")
        if not isinstance(value, str):
            raise InvalidArgument(f"{field}.{key}", f"must be a string, got {type(value).__name__}")
        setattr(out, key, value)
    if "kind" not in data:
        raise InvalidArgument(f"{field}.kind", "is required (BASE, LORA, CONTROLNET or FUSED)")
    out.kind = parse_kind(f"{field}.kind", data["kind"])  # type: ignore[assignment]
    if "format" in data and data["format"] not in (None, ""):
        out.format = parse_format(f"{field}.format", data["format"])  # type: ignore[assignment]
    size = data.get("bytes", 0)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size) or int(size) != size:
        raise InvalidArgument(f"{field}.bytes", f"must be an integer, got {size!r}")
    out.bytes = int(size)
    labels = data.get("labels") or {}
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise InvalidArgument(f"{field}.labels", "must be an object of string values")
    out.labels.update(labels)
    if base_dir is not None and out.uri and not _has_scheme(out.uri):
        check_uri(f"{field}.uri", out.uri)  # refuse pickles before touching the path
        out.uri = (base_dir / out.uri).resolve().as_uri()
    return validate_component(out, field)


def component_to_dict(component: common_pb2.Component) -> dict[str, Any]:
    """The manifest form of a record (short enum names; empty optional fields left out)."""
    out: dict[str, Any] = {
        "id": component.id,
        "kind": kind_name(component.kind),
        "family": component.family,
        "uri": component.uri,
        "bytes": int(component.bytes),
        "format": format_name(component.format),
    }
    if component.sha256:
        out["sha256"] = component.sha256
    if component.base_id:
        out["base_id"] = component.base_id
    if component.labels:
        out["labels"] = dict(sorted(component.labels.items()))
    return out


def parse_manifest(data: object, base_dir: Path | None = None) -> list[common_pb2.Component]:
    """Validates a manifest document; raises InvalidArgument naming ``components[i].field``."""
    if not isinstance(data, Mapping) or not isinstance(data.get("components"), list):
        raise InvalidArgument("components", 'the manifest must be an object with a "components" list')
    seen: set[str] = set()
    out = []
    for i, entry in enumerate(data["components"]):
        component = component_from_dict(entry, base_dir, field=f"components[{i}]")
        if component.id in seen:
            raise InvalidArgument(f"components[{i}].id", f"duplicate id {component.id!r}")
        seen.add(component.id)
        out.append(component)
    return out


def load_manifest(path: Path | str) -> list[common_pb2.Component]:
    """Reads and validates a ``catalog.json``; relative uris resolve against its folder.

    Raises :class:`ManifestError` with the path and the offending field.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"cannot read catalog manifest {path}: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"catalog manifest {path} is not valid JSON: {exc}") from exc
    try:
        return parse_manifest(data, path.resolve().parent)
    except InvalidArgument as exc:
        raise ManifestError(f"catalog manifest {path}: {exc.message}") from exc


def write_manifest(path: Path | str, components: list[common_pb2.Component]) -> Path:
    """Writes ``components`` as a manifest (ids sorted) and returns the path."""
    path = Path(path)
    doc = {"components": [component_to_dict(c) for c in sorted(components, key=lambda c: c.id)]}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def _has_scheme(uri: str) -> bool:
    scheme = urlsplit(uri).scheme
    return bool(scheme) and (len(scheme) > 1 or "://" in uri)
