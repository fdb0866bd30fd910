"""The configuration reference, generated from the pydantic settings classes.

Every setting is a field of a pydantic-settings class with a ``description``; this module
turns those fields into the markdown tables of the README (``diffmesh config --markdown``,
``make config-doc``), so the documentation cannot drift from the code. A static test
checks that the READMEs hold exactly what this module generates.

Generated blocks sit between markers in a markdown file::

    <!-- config-table:start -->            every table (the top-level README)
    <!-- config-table:start worker -->     one service's own settings
    <!-- config-table:end -->

The services' settings classes are imported only when asked for, so this module stays
importable without torch or any service installed.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from diffmesh.settings import ServiceSettings, TelemetrySettings

DOC_DEFAULT = "doc_default"
"""Key of a field's ``json_schema_extra`` that says how to document a computed default
(e.g. ``"host name"``): a ``default_factory`` whose value depends on the machine."""


@dataclass(frozen=True)
class ServiceDoc:
    """Where one service's settings class lives and how its table is titled."""

    name: str
    """Short name, used in the markers and by ``--service``."""
    title: str
    module: str
    class_name: str

    def settings_class(self) -> type[BaseSettings]:
        """The settings class (imported now)."""
        cls = getattr(importlib.import_module(self.module), self.class_name)
        if not (isinstance(cls, type) and issubclass(cls, BaseSettings)):
            raise TypeError(f"{self.module}.{self.class_name} is not a pydantic-settings class")
        return cls


SERVICES: tuple[ServiceDoc, ...] = (
    ServiceDoc("router", "Router", "diffmesh_router.settings", "RouterSettings"),
    ServiceDoc("coordinator", "Cache coordinator", "diffmesh_coordinator.settings", "CoordinatorSettings"),
    ServiceDoc("instance-manager", "Instance manager", "diffmesh_instance_manager.settings", "InstanceManagerSettings"),
    ServiceDoc("worker", "Worker", "diffmesh_worker.settings", "WorkerSettings"),
)

Row = tuple[str, str, str]

_BLOCK = re.compile(r"(<!-- config-table:start(?: ([\w-]+))? -->\n)(.*?)(<!-- config-table:end -->)", re.S)


def service(name: str) -> ServiceDoc:
    """The service called ``name`` (``router``, ``coordinator``, ``instance-manager``, ``worker``)."""
    for doc in SERVICES:
        if doc.name == name:
            return doc
    raise KeyError(f"unknown service {name!r}; known: {', '.join(d.name for d in SERVICES)}")


def env_prefix(cls: type[BaseSettings]) -> str:
    """The ``env_prefix`` of a settings class (upper case)."""
    return str(cls.model_config.get("env_prefix", "")).upper()


def env_names(cls: type[BaseSettings], name: str, field: FieldInfo) -> list[str]:
    """The environment variables that set ``field``, the preferred one first.

    A ``validation_alias`` (or ``alias``) replaces the prefixed name: pydantic-settings
    does not add ``env_prefix`` to it. ``AliasChoices`` lists fallbacks in order.
    """
    alias: Any = field.validation_alias or field.alias
    if isinstance(alias, str):
        return [alias.upper()]
    if isinstance(alias, AliasChoices):
        names = [choice.upper() for choice in alias.choices if isinstance(choice, str)]
        if names:
            return names
    return [f"{env_prefix(cls)}{name}".upper()]


def default_text(field: FieldInfo) -> str:
    """How a field's default reads in the table."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and DOC_DEFAULT in extra:
        return str(extra[DOC_DEFAULT])
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return _value_text(value)


def _value_text(value: Any) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, list | tuple | set | frozenset):
        return f"`{','.join(map(str, value))}`" if value else "empty"
    if value == "" or value is None:
        return "empty"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _meaning(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    if not field.description:
        raise ValueError(f"{cls.__name__}.{name} has no description: every setting needs one (it is the README text)")
    return field.description


def rows(cls: type[BaseSettings], names: Iterable[str] | None = None, *, after_prefix: bool = False) -> list[Row]:
    """One row per field of ``cls`` (or of ``names``, in that order): variable, default, meaning.

    ``after_prefix`` writes the variable without the class's ``env_prefix`` (for the
    settings every service shares, each under its own prefix).
    """
    fields = cls.model_fields
    out: list[Row] = []
    for name in names if names is not None else fields:
        field = fields[name]
        variables = [name.upper()] if after_prefix else env_names(cls, name, field)
        variable = f"`{variables[0]}`"
        if len(variables) > 1:
            variable += " (falls back to " + ", then ".join(f"`{v}`" for v in variables[1:]) + ")"
        out.append((variable, default_text(field), _meaning(cls, name, field)))
    return out


def own_fields(cls: type[BaseSettings]) -> list[str]:
    """Fields of a service's settings class that are not the shared :class:`ServiceSettings` ones.

    A shared field a service redefines (another default or meaning) counts as its own.
    """
    shared = ServiceSettings.model_fields
    own = []
    for name, field in cls.model_fields.items():
        base = shared.get(name)
        if base is None or (base.default, base.description) != (field.default, field.description):
            own.append(name)
    return own


def table(header: str, body: list[Row]) -> str:
    """A markdown table with the columns ``header`` | default | meaning."""
    lines = [f"| {header} | default | meaning |", "|---|---|---|"]
    lines += [f"| {_cell(v)} | {_cell(d)} | {_cell(m)} |" for v, d, m in body]
    return "\n".join(lines) + "\n"


def common_markdown() -> str:
    """The settings every service shares (under its prefix) and the OpenTelemetry ones."""
    prefixes = ", ".join(f"`{env_prefix(d.settings_class())}`" for d in SERVICES)
    return (
        f"Common to every service, each under its own prefix ({prefixes}):\n\n"
        + table("variable (after the prefix)", rows(ServiceSettings, after_prefix=True))
        + "\nTracing, the same for every service (standard OpenTelemetry variables):\n\n"
        + table("variable", rows(TelemetrySettings))
    )


def service_markdown(name: str) -> str:
    """The table of one service's own settings."""
    cls = service(name).settings_class()
    return table("variable", rows(cls, own_fields(cls)))


def markdown() -> str:
    """Every table: the common settings, then each service's own."""
    parts = [common_markdown()]
    for doc in SERVICES:
        parts.append(f"{doc.title} (prefix `{env_prefix(doc.settings_class())}`):\n\n{service_markdown(doc.name)}")
    return "\n".join(parts)


def update_markdown(text: str) -> str:
    """``text`` with every generated block between config-table markers regenerated."""

    def regenerate(m: re.Match[str]) -> str:
        body = service_markdown(m.group(2)) if m.group(2) else markdown()
        return f"{m.group(1)}\n{body}\n{m.group(4)}"

    return _BLOCK.sub(regenerate, text)


def has_blocks(text: str) -> bool:
    """Whether ``text`` holds at least one config-table block."""
    return _BLOCK.search(text) is not None
