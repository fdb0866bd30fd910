"""Events of the view change stream: how they are stored in Redis and built from the state.

Every entry of the ``{ns}view`` stream holds one ``diffmesh.v1.ViewEvent`` (without its
``event_id``, which is the entry's stream id) as base64 protobuf in the field ``e``, and
its kind (``residency``, ``load``, ``plan``, ``live``) in the field ``k``, so a reader can
skip what it does not want without decoding it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any

from diffmesh.v1 import coordinator_pb2, plan_pb2

EVENT_FIELD = "e"
KIND_FIELD = "k"

START_ID = "0-0"
"""The id before every entry: a snapshot of an empty (or absent) stream carries it."""

_ID_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")


def encode(message: Any) -> str:
    """Base64 of a message's wire bytes (the form plans, loads and events take in Redis)."""
    return base64.b64encode(message.SerializeToString()).decode()


def decode(raw: str, message: Any) -> Any:
    """Inverse of :func:`encode`, parsed into ``message`` (returned)."""
    message.ParseFromString(base64.b64decode(raw))
    return message


def entry_fields(event: plan_pb2.ViewEvent) -> dict[str, str]:
    """The stream entry of ``event`` (its ``event_id`` is left out: the entry id replaces it)."""
    kind = event.WhichOneof("change")
    if kind is None:
        raise ValueError("a view event needs a change")
    return {KIND_FIELD: kind, EVENT_FIELD: encode(event)}


def entry_event(entry_id: str, fields: Mapping[str, str]) -> plan_pb2.ViewEvent:
    """The event a stream entry holds, with ``event_id`` set to the entry's id."""
    event: plan_pb2.ViewEvent = decode(fields[EVENT_FIELD], plan_pb2.ViewEvent())
    event.event_id = entry_id
    return event


def parse_id(raw: str) -> tuple[int, int]:
    """``(ms, seq)`` of a stream id ``"ms-seq"``; ValueError for anything else."""
    match = _ID_RE.match(raw)
    if match is None:
        raise ValueError(f"{raw!r} is not a stream id (ms-seq)")
    return int(match.group(1)), int(match.group(2))


def stream_holds(after_id: str, info: Mapping[str, Any] | None) -> bool:
    """Whether every entry after ``after_id`` is still in the stream ``XINFO STREAM`` described.

    ``info`` None: the stream does not exist (never written, or Redis lost it), which holds
    only the start. An id beyond the last generated one comes from another incarnation of
    the stream. Trimming (``MAXLEN``) removes the oldest entries: when some were removed, an
    id older than the first entry left may have missed some (an id that was itself the last
    one removed is refused too: one snapshot more, nothing lost). Entries deleted one by one
    (``XDEL``, not used here) count through ``max-deleted-entry-id``.
    """
    after = parse_id(after_id)
    if info is None:
        return after == (0, 0)
    last = parse_id(str(info.get("last-generated-id") or START_ID))
    if after > last or after < parse_id(str(info.get("max-deleted-entry-id") or START_ID)):
        return False
    length = int(info.get("length") or 0)
    if int(info.get("entries-added") or length) <= length:
        return True  # nothing was removed
    if length == 0:
        return after == last
    first = info.get("first-entry")
    first_id = parse_id(str(first[0])) if first else last
    return after >= first_id


def residency_event(
    node_id: str, worker_id: str, updates: Sequence[coordinator_pb2.ResidencyUpdate], full_snapshot: bool
) -> plan_pb2.ViewEvent:
    """The event of one applied ReportResidency (a full snapshot lists only the present copies)."""
    change = plan_pb2.ResidencyChange(node_id=node_id, worker_id=worker_id, full_snapshot=full_snapshot)
    for u in updates:
        if full_snapshot and not u.present:
            continue
        change.copies.add(
            component_id=u.component_id, tier=u.tier, present=u.present, bytes=u.bytes, last_used_unix=u.last_used_unix
        )
    return plan_pb2.ViewEvent(residency=change)


def live_set(nodes: Sequence[coordinator_pb2.NodeInfo]) -> plan_pb2.LiveSet:
    """The LiveSet of ListNodes' answer."""
    live = plan_pb2.LiveSet()
    for node in nodes:
        entry = live.nodes.add(node_id=node.node_id, instance_manager_address=node.instance_manager_address)
        for w in node.workers:
            entry.workers.add(worker_id=w.worker_id, address=w.address, device_memory_bytes=w.device_memory_bytes)
    return live
