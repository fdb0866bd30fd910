"""The coordinator's Redis key layout (documented as a table in the service README).

Every key starts with the configured namespace (default ``dm:``). Ids use the charset
``[A-Za-z0-9._:-]``, so ``/`` and ``|`` are safe separators inside keys and hash fields,
and each key family differs from the others before the first id, so no id can make two
families collide (``dm:node:x:workers`` is always node ``x:workers``'s lease).
"""

from __future__ import annotations

from dataclasses import dataclass


def reporter_of(node_id: str, worker_id: str) -> str:
    """``node/worker`` (``node/`` for the node's instance manager): who reported a residency."""
    return f"{node_id}/{worker_id}"


def split_reporter(reporter: str) -> tuple[str, str]:
    """Inverse of :func:`reporter_of`."""
    node_id, _, worker_id = reporter.partition("/")
    return node_id, worker_id


@dataclass(frozen=True)
class KeyLayout:
    """Builds every Redis key the coordinator uses."""

    ns: str = "dm:"

    @property
    def catalog(self) -> str:
        """HASH id → component JSON: the catalog (the only durable state)."""
        return f"{self.ns}catalog"

    @property
    def catalog_ids(self) -> str:
        """ZSET of catalog ids, all with score 0, for ordered paging (ZRANGEBYLEX)."""
        return f"{self.ns}catalog-ids"

    @property
    def nodes(self) -> str:
        """SET of node ids that registered (dead ones are pruned by the sweeper)."""
        return f"{self.ns}nodes"

    def node(self, node_id: str) -> str:
        """STRING NodeInfo JSON with a TTL: the node's lease."""
        return f"{self.ns}node:{node_id}"

    def node_workers(self, node_id: str) -> str:
        """SET of worker ids that registered on the node."""
        return f"{self.ns}node-workers:{node_id}"

    def worker(self, node_id: str, worker_id: str) -> str:
        """STRING WorkerInfo JSON with a TTL: the worker's lease."""
        return f"{self.ns}worker:{node_id}/{worker_id}"

    @property
    def reporters(self) -> str:
        """SET of ``node/worker`` reporters holding residency state."""
        return f"{self.ns}reporters"

    def residency(self, reporter: str) -> str:
        """HASH ``component|TIER`` → ``bytes last_used_unix``: what one reporter holds."""
        return f"{self.ns}res:{reporter}"

    def location(self, component_id: str) -> str:
        """HASH ``node/worker|TIER`` → ``bytes last_used_unix``: where one component lives."""
        return f"{self.ns}loc:{component_id}"

    @property
    def requests(self) -> str:
        """STREAM of served requests (capped with MAXLEN ~)."""
        return f"{self.ns}requests"

    @property
    def component_popularity(self) -> str:
        """ZSET component id → forward-decayed count of recorded requests that used it (scaled, see ``popularity_ref``)."""
        return f"{self.ns}pop:components"

    @property
    def pipeline_popularity(self) -> str:
        """ZSET canonical pipeline key → forward-decayed count of recorded requests (scaled)."""
        return f"{self.ns}pop:pipelines"

    @property
    def popularity_ref(self) -> str:
        """STRING: reference time (Unix seconds) the popularity scores are scaled against."""
        return f"{self.ns}pop:ref"

    @property
    def pipeline_components(self) -> str:
        """HASH canonical pipeline key → comma-joined component ids (base first), from the records."""
        return f"{self.ns}pop:pipeline-components"

    @property
    def view(self) -> str:
        """STREAM of view changes (residency, loads, plans, live set) that WatchView follows."""
        return f"{self.ns}view"

    @property
    def loads(self) -> str:
        """HASH ``node/worker`` → base64 WorkerLoad: each worker's last reported load."""
        return f"{self.ns}loads"

    @property
    def plan(self) -> str:
        """STRING base64 Plan: the current plan."""
        return f"{self.ns}plan"

    @property
    def plan_lock(self) -> str:
        """STRING with a TTL: id of the coordinator replica that plans (the planner lock)."""
        return f"{self.ns}plan-lock"
