"""Every check the router makes on a generation request before forwarding it.

Two stages: :func:`validate_request` needs only the request (the shared rules of
:mod:`diffmesh.request_validation` plus the router's own request id and tenant limits) and
runs first; :func:`validate_against_catalog` needs the catalog records of the pipeline's
components (kinds and families). Each failure raises
:class:`~diffmesh.errors.InvalidArgument` naming the field, e.g. ``params.steps`` or
``pipeline.loras[1].scale``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from diffmesh.catalog import kind_name
from diffmesh.errors import InvalidArgument
from diffmesh.request_validation import validate_generation
from diffmesh.v1 import common_pb2

MAX_TEXT_ID_CHARS = 128

PRINTABLE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
BASE_KINDS = (common_pb2.COMPONENT_KIND_BASE, common_pb2.COMPONENT_KIND_FUSED)


def validate_request(
    request_id: str, tenant: str, pipeline: common_pb2.PipelineSpec, params: common_pb2.GenerationParams
) -> None:
    """Every check that needs only the request itself (stage one); decodes its input images."""
    if request_id and not PRINTABLE_ID.match(request_id):
        raise InvalidArgument("request_id", f"must be 1-{MAX_TEXT_ID_CHARS} printable ASCII characters without spaces")
    if len(tenant) > MAX_TEXT_ID_CHARS:
        raise InvalidArgument("tenant", f"must be at most {MAX_TEXT_ID_CHARS} characters")
    validate_generation(pipeline, params)


def component_ids(pipeline: common_pb2.PipelineSpec) -> list[str]:
    """Every component id the pipeline uses, base first, without duplicates, in request order."""
    ids = [pipeline.base_id, *(lora.id for lora in pipeline.loras), *(cn.id for cn in pipeline.controlnets)]
    return list(dict.fromkeys(ids))


def validate_against_catalog(pipeline: common_pb2.PipelineSpec, records: Mapping[str, common_pb2.Component]) -> None:
    """Checks kinds and families against the catalog records of every component (stage two).

    The base may be a BASE or a FUSED overlay (the worker runs it instead of runtime
    adapters); LoRAs and ControlNets must be of the base's — or the overlay's — family.
    """
    base = records[pipeline.base_id]
    if base.kind not in BASE_KINDS:
        raise InvalidArgument("pipeline.base_id", f"{base.id!r} is a {kind_name(base.kind)}, not a base model")
    for i, lora in enumerate(pipeline.loras):
        rec = records[lora.id]
        if rec.kind != common_pb2.COMPONENT_KIND_LORA:
            raise InvalidArgument(f"pipeline.loras[{i}].id", f"{rec.id!r} is a {kind_name(rec.kind)}, not a LORA")
        if rec.family != base.family:
            raise InvalidArgument(
                f"pipeline.loras[{i}].id", f"{rec.id!r} is family {rec.family!r}, the base {base.id!r} is {base.family!r}"
            )
    for i, cn in enumerate(pipeline.controlnets):
        rec = records[cn.id]
        if rec.kind != common_pb2.COMPONENT_KIND_CONTROLNET:
            raise InvalidArgument(f"pipeline.controlnets[{i}].id", f"{rec.id!r} is a {kind_name(rec.kind)}, not a CONTROLNET")
        if rec.family != base.family:
            raise InvalidArgument(
                f"pipeline.controlnets[{i}].id", f"{rec.id!r} is family {rec.family!r}, the base {base.id!r} is {base.family!r}"
            )
