"""The coordinator's state in Redis: catalog, leases, residency, request records, loads, the view stream.

Inputs are validated by the servicer; this module owns the Redis layout
(:class:`~diffmesh_coordinator.keys.KeyLayout`) and keeps it consistent:

* the catalog is written with one Lua script, so a record and its paging index never
  diverge and concurrent registrations of one id cannot both "create" it;
* leases are keys with a TTL (``PX``); a lease that lapsed makes its holder's residency
  invisible at once (Locate checks liveness) and it is purged by :meth:`sweep` or when the
  holder registers again;
* residency writes run in WATCH/MULTI transactions on the reporter's lease, so a report
  never lands on a lease that expired or was renewed by a re-registration mid-way;
* every change of the global view is appended to the view stream (``{ns}view``, see
  :mod:`~diffmesh_coordinator.view_events`): residency and load changes in the same
  transaction as the change itself, live-set changes right after the registration or
  purge that caused them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from diffmesh.catalog import ID_RE, component_from_dict, component_to_dict
from diffmesh.errors import AlreadyExists, InvalidArgument, NotFound
from diffmesh.v1 import common_pb2, coordinator_pb2, plan_pb2
from google.protobuf import json_format

from diffmesh_coordinator import view_events
from diffmesh_coordinator.keys import KeyLayout, reporter_of, split_reporter
from diffmesh_coordinator.popularity import DecayedPopularity, PopularityCounter

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS: catalog hash, id index; ARGV: id, record JSON.
# Returns {1, record} when created, {0, existing record} when the id was taken.
_REGISTER_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
  return {1, ARGV[2]}
end
return {0, redis.call('HGET', KEYS[1], ARGV[1])}
"""

# KEYS: lock key; ARGV: holder token, TTL in ms. Takes a free lock or renews our own; 1 when held.
_HOLD_LOCK_LUA = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lock key; ARGV: holder token. Releases the lock only when we hold it.
_RELEASE_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_LIST_BATCH = 256


async def _r(value: Any) -> Any:
    """Awaits a redis-py call (its type hints mix the sync and async clients' return types)."""
    return await cast(Awaitable[Any], value)


def encode_record(component: common_pb2.Component) -> str:
    """Canonical JSON of a catalog record, as stored in Redis."""
    return json.dumps(component_to_dict(component), sort_keys=True, separators=(",", ":"))


def decode_record(raw: str) -> common_pb2.Component:
    """Inverse of :func:`encode_record`."""
    return component_from_dict(json.loads(raw))


_TOKEN_PREFIX = "after:"


def encode_page_token(last_id: str) -> str:
    """Opaque page token for the id after which the next page starts."""
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + last_id).encode()).decode()


def decode_page_token(token: str) -> str:
    """The id a page token continues after; INVALID_ARGUMENT when it is not ours."""
    try:
        text = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise InvalidArgument("page_token", "not a token returned by ListComponents") from exc
    if not text.startswith(_TOKEN_PREFIX) or not ID_RE.match(text.removeprefix(_TOKEN_PREFIX)):
        raise InvalidArgument("page_token", "not a token returned by ListComponents")
    return text.removeprefix(_TOKEN_PREFIX)


def _residency_value(bytes_: int, last_used_unix: float) -> str:
    return f"{bytes_} {last_used_unix!r}"


def _parse_residency_value(raw: str) -> tuple[int, float]:
    size, _, last_used = raw.partition(" ")
    return int(size), float(last_used or 0.0)


@dataclass
class ReportResult:
    """Outcome of one ReportResidency call."""

    applied: int


class CoordinatorStore:
    """Coordinator state on one Redis database, every key under ``keys.ns``."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: KeyLayout,
        lease_seconds: float,
        request_stream_maxlen: int = 100_000,
        popularity: PopularityCounter | None = None,
        view_stream_maxlen: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.lease_seconds = lease_seconds
        self.request_stream_maxlen = request_stream_maxlen
        self.view_stream_maxlen = view_stream_maxlen
        self.clock = clock
        """Wall clock of popularity accounting (tests inject one to move time without sleeping)."""
        self.popularity: PopularityCounter = popularity or DecayedPopularity(clock=clock)
        self._register = client.register_script(_REGISTER_LUA)
        self._hold_lock = client.register_script(_HOLD_LOCK_LUA)
        self._release_lock = client.register_script(_RELEASE_LOCK_LUA)

    @property
    def lease_ms(self) -> int:
        """Lease length in milliseconds (at least 1)."""
        return max(1, round(self.lease_seconds * 1000))

    # ---------------------------------------------------------------- catalog

    async def register_component(
        self, component: common_pb2.Component, replace: bool = False
    ) -> tuple[common_pb2.Component, bool]:
        """Stores a validated record; returns ``(stored, created)``.

        An identical record under the same id is a no-op (``created`` false); a different
        one is ALREADY_EXISTS unless ``replace`` (used for the manifest at start).
        """
        raw = encode_record(component)
        created, stored_raw = await self._register(keys=[self.keys.catalog, self.keys.catalog_ids], args=[component.id, raw])
        if int(created):
            return component, True
        stored = decode_record(stored_raw)
        if stored == component:
            return stored, False
        if replace:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.keys.catalog, component.id, raw)
                pipe.zadd(self.keys.catalog_ids, {component.id: 0})
                await pipe.execute()
            log.warning("catalog record replaced", extra={"component_id": component.id})
            return component, True
        raise AlreadyExists(
            f"component {component.id!r} already exists with a different record "
            f"(stored uri {stored.uri!r} sha256 {stored.sha256 or '-'!r}; given uri {component.uri!r} "
            f"sha256 {component.sha256 or '-'!r}); register it under a new id"
        )

    async def get_component(self, component_id: str) -> common_pb2.Component:
        """One catalog record; NOT_FOUND naming the id."""
        raw = await _r(self.redis.hget(self.keys.catalog, component_id))
        if raw is None:
            raise NotFound("component", component_id)
        return decode_record(raw)

    async def missing_components(self, ids: Sequence[str]) -> list[str]:
        """The ids of ``ids`` that are not in the catalog, in order."""
        found = await _r(self.redis.hmget(self.keys.catalog, list(ids)))
        return [cid for cid, raw in zip(ids, found, strict=True) if raw is None]

    async def list_components(
        self, kind: int, family: str, page_size: int, page_token: str
    ) -> tuple[list[common_pb2.Component], str]:
        """A page of records ordered by id, filtered by kind and family; returns ``(page, next_token)``."""
        after = decode_page_token(page_token) if page_token else ""
        out: list[common_pb2.Component] = []
        while len(out) <= page_size:
            low = f"({after}" if after else "-"
            ids = await _r(self.redis.zrangebylex(self.keys.catalog_ids, low, "+", start=0, num=_LIST_BATCH))
            if not ids:
                break
            raws = await _r(self.redis.hmget(self.keys.catalog, ids))
            for raw in raws:
                if raw is None:
                    continue
                component = decode_record(raw)
                if kind and component.kind != kind:
                    continue
                if family and component.family != family:
                    continue
                out.append(component)
                if len(out) > page_size:
                    break
            after = ids[-1]
            if len(ids) < _LIST_BATCH:
                break
        if len(out) > page_size:
            out = out[:page_size]
            return out, encode_page_token(out[-1].id)
        return out, ""

    # ---------------------------------------------------------------- leases

    async def register_node(self, node: coordinator_pb2.NodeInfo) -> bool:
        """Starts or renews a node's lease; returns True when it was not live (new or expired).

        A node that was not live starts with no residency: whatever an earlier incarnation
        reported is dropped, and the node re-reports.
        """
        info = coordinator_pb2.NodeInfo()
        info.CopyFrom(node)
        del info.workers[:]
        lease_key = self.keys.node(node.node_id)
        fresh = await self._take_lease(lease_key, reporter_of(node.node_id, ""), _to_json(info))
        await _r(self.redis.sadd(self.keys.nodes, node.node_id))
        await self.publish_live_set()
        return fresh

    async def register_worker(self, worker: coordinator_pb2.WorkerInfo) -> bool:
        """Starts or renews a worker's lease; returns True when it was not live (its GPU residency is dropped)."""
        lease_key = self.keys.worker(worker.node_id, worker.worker_id)
        fresh = await self._take_lease(lease_key, reporter_of(worker.node_id, worker.worker_id), _to_json(worker))
        await _r(self.redis.sadd(self.keys.node_workers(worker.node_id), worker.worker_id))
        await self.publish_live_set()
        return fresh

    async def _take_lease(self, lease_key: str, reporter: str, value: str) -> bool:
        res_key = self.keys.residency(reporter)
        fresh = False

        async def tx(pipe: Any) -> None:
            nonlocal fresh
            fresh = not await pipe.exists(lease_key)
            stale = await pipe.hkeys(res_key) if fresh else []
            pipe.multi()
            if fresh:
                self._queue_drop(pipe, reporter, stale)
            pipe.set(lease_key, value, px=self.lease_ms)

        await self.redis.transaction(tx, lease_key, res_key)
        return fresh

    async def heartbeat(self, node_id: str, worker_id: str) -> bool:
        """Renews a lease; returns False when it had expired (the holder must register again)."""
        key = self.keys.worker(node_id, worker_id) if worker_id else self.keys.node(node_id)
        return bool(await _r(self.redis.pexpire(key, self.lease_ms)))

    async def list_nodes(self) -> list[coordinator_pb2.NodeInfo]:
        """Live nodes ordered by id, each with its live workers ordered by id."""
        node_ids = sorted(await _r(self.redis.smembers(self.keys.nodes)))
        if not node_ids:
            return []
        raws = await _r(self.redis.mget([self.keys.node(n) for n in node_ids]))
        nodes = [_from_json(raw, coordinator_pb2.NodeInfo()) for raw in raws if raw is not None]
        async with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.smembers(self.keys.node_workers(node.node_id))
            worker_sets = await pipe.execute()
        for node, worker_ids in zip(nodes, worker_sets, strict=True):
            ordered = sorted(worker_ids)
            if not ordered:
                continue
            for raw in await _r(self.redis.mget([self.keys.worker(node.node_id, w) for w in ordered])):
                if raw is not None:
                    node.workers.append(_from_json(raw, coordinator_pb2.WorkerInfo()))
        return nodes

    # ---------------------------------------------------------------- residency

    async def report_residency(
        self, node_id: str, worker_id: str, updates: Sequence[coordinator_pb2.ResidencyUpdate], full_snapshot: bool
    ) -> int:
        """Applies validated updates of one reporter; NOT_FOUND when its lease is not live."""
        reporter = reporter_of(node_id, worker_id)
        lease_key = self.keys.worker(node_id, worker_id) if worker_id else self.keys.node(node_id)
        res_key = self.keys.residency(reporter)

        async def tx(pipe: Any) -> None:
            if not await pipe.exists(lease_key):
                if worker_id:
                    raise NotFound("worker", f"{node_id}/{worker_id}")
                raise NotFound("node", node_id)
            stale = await pipe.hkeys(res_key) if full_snapshot else []
            pipe.multi()
            self._queue_drop(pipe, reporter, stale, publish=False)  # the full snapshot's own event says it
            for u in updates:
                tier = common_pb2.Tier.Name(u.tier)
                res_field, loc_field = f"{u.component_id}|{tier}", f"{reporter}|{tier}"
                if u.present:
                    value = _residency_value(u.bytes, u.last_used_unix)
                    pipe.hset(res_key, res_field, value)
                    pipe.hset(self.keys.location(u.component_id), loc_field, value)
                elif not full_snapshot:
                    pipe.hdel(res_key, res_field)
                    pipe.hdel(self.keys.location(u.component_id), loc_field)
            pipe.sadd(self.keys.reporters, reporter)
            if updates or full_snapshot:
                self.queue_event(pipe, view_events.residency_event(node_id, worker_id, updates, full_snapshot))

        await self.redis.transaction(tx, lease_key, res_key)
        return len(updates)

    def _queue_drop(self, pipe: Any, reporter: str, res_fields: Sequence[str], publish: bool = True) -> None:
        """Queues removal of every residency of ``reporter`` (its ``res`` fields and their ``loc`` mirrors).

        When it held anything (and ``publish``), the view stream gets an empty full snapshot of the reporter.
        """
        for res_field in res_fields:
            component_id, _, tier = res_field.rpartition("|")
            pipe.hdel(self.keys.location(component_id), f"{reporter}|{tier}")
        if res_fields:
            pipe.delete(self.keys.residency(reporter))
        if res_fields and publish:
            node_id, worker_id = split_reporter(reporter)
            self.queue_event(pipe, view_events.residency_event(node_id, worker_id, (), True))

    def queue_event(self, pipe: Any, event: plan_pb2.ViewEvent) -> None:
        """Queues the append of ``event`` to the view stream (capped with ``MAXLEN ~``) on ``pipe``."""
        pipe.xadd(
            self.keys.view, view_events.entry_fields(event), maxlen=self.view_stream_maxlen, approximate=True  # type: ignore[arg-type]
        )

    async def publish_live_set(self) -> None:
        """Appends the current live set to the view stream."""
        event = plan_pb2.ViewEvent(live=view_events.live_set(await self.list_nodes()))
        async with self.redis.pipeline(transaction=False) as pipe:
            self.queue_event(pipe, event)
            await pipe.execute()

    async def locate(self, component_ids: Sequence[str]) -> list[coordinator_pb2.ComponentLocation]:
        """Copies of each component on live nodes (and live workers for GPU copies), in request order.

        Within a component: fastest tier first, then node and worker id.
        """
        unique = list(dict.fromkeys(component_ids))
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in unique:
                pipe.hgetall(self.keys.location(cid))
            entries: list[dict[str, str]] = await pipe.execute()
        reporters = sorted({field.rpartition("|")[0] for entry in entries for field in entry})
        live = await self._live_reporters(reporters)
        by_id: dict[str, list[common_pb2.Residency]] = {}
        for cid, entry in zip(unique, entries, strict=True):
            copies = []
            for field, raw in entry.items():
                reporter, _, tier = field.rpartition("|")
                if reporter not in live:
                    continue
                node_id, worker_id = split_reporter(reporter)
                size, last_used = _parse_residency_value(raw)
                tier_value = common_pb2.Tier.Value(tier)
                copies.append(
                    common_pb2.Residency(
                        node_id=node_id, worker_id=worker_id, tier=tier_value, bytes=size, last_used_unix=last_used
                    )
                )
            copies.sort(key=lambda r: (-r.tier, r.node_id, r.worker_id))
            by_id[cid] = copies
        return [coordinator_pb2.ComponentLocation(component_id=cid, residencies=by_id[cid]) for cid in component_ids]

    async def _live_reporters(self, reporters: Sequence[str]) -> set[str]:
        """Reporters whose node lease is live and, for workers, whose worker lease is live too."""
        if not reporters:
            return set()
        pairs = [split_reporter(r) for r in reporters]
        node_ids = sorted({n for n, _ in pairs})
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in node_ids:
                pipe.exists(self.keys.node(n))
            for n, w in pairs:
                pipe.exists(self.keys.worker(n, w) if w else self.keys.node(n))
            flags = await pipe.execute()
        live_nodes = {n for n, ok in zip(node_ids, flags[: len(node_ids)], strict=True) if ok}
        own = flags[len(node_ids) :]
        return {r for r, (n, _), ok in zip(reporters, pairs, own, strict=True) if ok and n in live_nodes}

    async def sweep(self) -> int:
        """Purges state whose lease lapsed: residency, node and worker index entries; returns purges.

        Each purge is a WATCH transaction on the lease key, so a holder that registers again
        meanwhile keeps its fresh state.
        """
        purged = 0
        for reporter in sorted(await _r(self.redis.smembers(self.keys.reporters))):
            node_id, worker_id = split_reporter(reporter)
            lease_key = self.keys.worker(node_id, worker_id) if worker_id else self.keys.node(node_id)
            purged += await self._purge_if_dead(lease_key, reporter)
        for node_id in sorted(await _r(self.redis.smembers(self.keys.nodes))):
            workers_key = self.keys.node_workers(node_id)
            for worker_id in sorted(await _r(self.redis.smembers(workers_key))):
                lease_key = self.keys.worker(node_id, worker_id)
                purged += await self._srem_if_dead(lease_key, workers_key, worker_id, reporter_of(node_id, worker_id))
            purged += await self._srem_if_dead(self.keys.node(node_id), self.keys.nodes, node_id)
        if purged:
            await self.publish_live_set()
        return purged

    async def _purge_if_dead(self, lease_key: str, reporter: str) -> int:
        res_key = self.keys.residency(reporter)
        done = 0

        async def tx(pipe: Any) -> None:
            nonlocal done
            if await pipe.exists(lease_key):
                return
            stale = await pipe.hkeys(res_key)
            pipe.multi()
            self._queue_drop(pipe, reporter, stale)
            pipe.srem(self.keys.reporters, reporter)
            done = 1

        await self.redis.transaction(tx, lease_key, res_key)
        return done

    async def _srem_if_dead(self, lease_key: str, set_key: str, member: str, load_field: str = "") -> int:
        done = 0

        async def tx(pipe: Any) -> None:
            nonlocal done
            if await pipe.exists(lease_key):
                return
            pipe.multi()
            pipe.srem(set_key, member)
            if load_field:
                pipe.hdel(self.keys.loads, load_field)
            done = 1

        await self.redis.transaction(tx, lease_key)
        return done

    # ---------------------------------------------------------------- requests

    async def record_requests(self, records: Sequence[coordinator_pb2.RequestRecord]) -> int:
        """Appends validated records to the capped request stream and bumps popularity counts."""
        if not records:
            return 0
        now = self.clock()

        async def tx(pipe: Any) -> None:
            prepared = await self.popularity.prepare(pipe, self.keys, now)
            pipe.multi()
            for r in records:
                pipe.xadd(
                    self.keys.requests,
                    {
                        "request_id": r.request_id,
                        "pipeline_key": r.pipeline_key,
                        "component_ids": ",".join(r.component_ids),
                        "tenant": r.tenant,
                        "arrival_unix": repr(r.arrival_unix or now),
                        "task": common_pb2.Task.Name(r.task),
                        "num_images": str(r.num_images or 1),
                    },
                    maxlen=self.request_stream_maxlen,
                    approximate=True,
                )
            self.popularity.queue_updates(pipe, self.keys, records, prepared)

        await self.redis.transaction(tx, *self.popularity.watched_keys(self.keys))
        return len(records)

    async def component_popularity(self, limit: int) -> list[tuple[str, float]]:
        """The ``limit`` most requested components with their decayed counts now, most requested first (ties by id)."""
        return await self.popularity.component_counts(self.redis, self.keys, limit, self.clock())

    # ---------------------------------------------------------------- loads and plans

    async def report_load(self, load: plan_pb2.WorkerLoad) -> None:
        """Stores a worker's load and appends it to the view stream; NOT_FOUND when its lease is not live."""
        node_id, worker_id = load.worker.node_id, load.worker.worker_id
        lease_key = self.keys.worker(node_id, worker_id)

        async def tx(pipe: Any) -> None:
            if not await pipe.exists(lease_key):
                raise NotFound("worker", f"{node_id}/{worker_id}")
            pipe.multi()
            pipe.hset(self.keys.loads, reporter_of(node_id, worker_id), view_events.encode(load))
            self.queue_event(pipe, plan_pb2.ViewEvent(load=load))

        await self.redis.transaction(tx, lease_key)

    async def loads(self) -> dict[tuple[str, str], plan_pb2.WorkerLoad]:
        """Every stored load by ``(node_id, worker_id)`` (lapsed workers' too, until the sweeper drops them)."""
        raw = await _r(self.redis.hgetall(self.keys.loads))
        out: dict[tuple[str, str], plan_pb2.WorkerLoad] = {}
        for field, value in raw.items():
            out[split_reporter(field)] = view_events.decode(value, plan_pb2.WorkerLoad())
        return out

    async def get_plan(self) -> plan_pb2.Plan:
        """The current plan (version 0 when there is none yet)."""
        raw = await _r(self.redis.get(self.keys.plan))
        return plan_pb2.Plan() if raw is None else view_events.decode(raw, plan_pb2.Plan())

    async def hold_plan_lock(self, token: str, ttl_ms: int) -> bool:
        """Takes the planner lock for ``token``, or renews it when ``token`` holds it; True when held."""
        return bool(await self._hold_lock(keys=[self.keys.plan_lock], args=[token, ttl_ms]))

    async def release_plan_lock(self, token: str) -> None:
        """Releases the planner lock if ``token`` holds it."""
        await self._release_lock(keys=[self.keys.plan_lock], args=[token])

    async def publish_plan(self, plan: plan_pb2.Plan, expected_version: int, token: str) -> bool:
        """Stores ``plan`` and appends it to the view stream, if ``token`` still holds the planner lock and the
        stored plan still has ``expected_version``; returns whether it did."""
        published = False

        async def tx(pipe: Any) -> None:
            nonlocal published
            published = False
            if await pipe.get(self.keys.plan_lock) != token:
                return
            raw = await pipe.get(self.keys.plan)
            current = 0 if raw is None else view_events.decode(raw, plan_pb2.Plan()).version
            if current != expected_version:
                return
            pipe.multi()
            pipe.set(self.keys.plan, view_events.encode(plan))
            self.queue_event(pipe, plan_pb2.ViewEvent(plan=plan))
            published = True

        await self.redis.transaction(tx, self.keys.plan_lock, self.keys.plan)
        return published

    async def catalog_sizes(self, component_ids: Sequence[str]) -> dict[str, int]:
        """Catalog bytes of those of ``component_ids`` that are in the catalog."""
        ids = list(dict.fromkeys(component_ids))
        if not ids:
            return {}
        raws = await _r(self.redis.hmget(self.keys.catalog, ids))
        return {cid: decode_record(raw).bytes for cid, raw in zip(ids, raws, strict=True) if raw is not None}

    async def holdings(self, node_ids: Sequence[str]) -> dict[str, dict[str, tuple[int, int, float]]]:
        """Per node, what its instance manager reported: component id → ``(tier, bytes, last_used_unix)``.

        A component in both SSD and HOST is listed with HOST (the faster copy).
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in node_ids:
                pipe.hgetall(self.keys.residency(reporter_of(n, "")))
            entries: list[dict[str, str]] = await pipe.execute()
        out: dict[str, dict[str, tuple[int, int, float]]] = {}
        for n, entry in zip(node_ids, entries, strict=True):
            held: dict[str, tuple[int, int, float]] = {}
            for field, raw in entry.items():
                cid, _, tier_name = field.rpartition("|")
                tier = common_pb2.Tier.Value(tier_name)
                size, last_used = _parse_residency_value(raw)
                if cid not in held or tier > held[cid][0]:
                    held[cid] = (tier, size, last_used)
            out[n] = held
        return out

    # ---------------------------------------------------------------- the view

    async def stream_info(self) -> dict[str, Any] | None:
        """``XINFO STREAM`` of the view stream; None when it does not exist."""
        try:
            return cast(dict[str, Any], await self.redis.xinfo_stream(self.keys.view))
        except aioredis.ResponseError:
            return None

    async def snapshot(self, plans_only: bool) -> plan_pb2.ViewEvent:
        """A snapshot event of the whole view (only its plan with ``plans_only``).

        Its ``event_id`` is the stream's last id read *before* the state, so following the
        stream after it can only repeat changes the snapshot already shows; residency,
        load and live-set events are idempotent, so a repeat is harmless.
        """
        info = await self.stream_info()
        event_id = str(info.get("last-generated-id") or view_events.START_ID) if info else view_events.START_ID
        snap = plan_pb2.ViewSnapshot(plan=await self.get_plan())
        if not plans_only:
            nodes = await self.list_nodes()
            snap.live.CopyFrom(view_events.live_set(nodes))
            live_workers = {(n.node_id, w.worker_id) for n in nodes for w in n.workers}
            reporters = sorted(await _r(self.redis.smembers(self.keys.reporters)))
            live = sorted(await self._live_reporters(reporters))
            async with self.redis.pipeline(transaction=False) as pipe:
                for reporter in live:
                    pipe.hgetall(self.keys.residency(reporter))
                entries: list[dict[str, str]] = await pipe.execute()
            for reporter, entry in zip(live, entries, strict=True):
                node_id, worker_id = split_reporter(reporter)
                change = snap.residency.add(node_id=node_id, worker_id=worker_id, full_snapshot=True)
                for field, raw in sorted(entry.items()):
                    cid, _, tier = field.rpartition("|")
                    size, last_used = _parse_residency_value(raw)
                    tier_value = common_pb2.Tier.Value(tier)
                    change.copies.add(component_id=cid, tier=tier_value, present=True, bytes=size, last_used_unix=last_used)
            for key, load in sorted((await self.loads()).items()):
                if key in live_workers:
                    snap.loads.append(load)
        return plan_pb2.ViewEvent(event_id=event_id, snapshot=snap)

    async def read_events(self, after_id: str, count: int, block_ms: int | None) -> list[tuple[str, dict[str, str]]]:
        """Up to ``count`` stream entries after ``after_id``, waiting at most ``block_ms`` for the first (None: no wait)."""
        rows: Any = await self.redis.xread({self.keys.view: after_id}, count=count, block=block_ms)
        if not rows:
            return []
        entries = rows[self.keys.view][0] if isinstance(rows, dict) else rows[0][1]
        return [(str(entry_id), dict(fields)) for entry_id, fields in entries]


def _to_json(message: Any) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None)


def _from_json(raw: str, message: T) -> T:
    return json_format.Parse(raw, message, ignore_unknown_fields=True)  # type: ignore[type-var]
