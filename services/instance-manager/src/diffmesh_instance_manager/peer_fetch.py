"""The PEER tier, receiving side: a component's SSD copy fetched from another node's instance manager.

When a component is not on this node's SSD, :class:`PeerCopies` asks the coordinator
where it lives (``Locate``, off the router's request path: only on an SSD miss) and
streams the artifact from a node whose SSD holds it (``ReadArtifact`` of that node's
instance manager, :mod:`.artifact_stream`). The bytes go to the SSD tier's ``tmp/`` and
are checked against this node's catalog record exactly like a REMOTE fetch (the folder
digest for a folder, the record's sha256 for a FUSED overlay); only then does the SSD
tier publish them. A peer that fails, disappears or sends bytes that do not match is
skipped with a log line, and the store falls back to REMOTE.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from diffmesh.artifacts import folder_digest_from, is_pickle_path
from diffmesh.channels import open_channel
from diffmesh.errors import DataLoss
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, instance_manager_pb2, instance_manager_pb2_grpc
from grpc import StatusCode, aio

from diffmesh_instance_manager.fetch_common import fsync_dir

log = logging.getLogger(__name__)

#: Deadline of the coordinator calls (``Locate`` runs inside an Acquire's SSD miss: a slow view falls back to REMOTE).
RPC_TIMEOUT_S = 3.0
#: A stream's deadline: this long plus the artifact's bytes at :data:`MIN_PEER_BPS`.
STREAM_BASE_S = 30.0
MIN_PEER_BPS = 20e6
#: Longest wait for the next chunk (a peer that stops sending is given up on, not waited for).
CHUNK_TIMEOUT_S = 10.0
#: A peer that could not be reached is not asked again for this long (its lease may outlive it).
UNREACHABLE_BACKOFF_S = 10.0
#: Status codes that mean the peer itself is unreachable (not that it lacks the copy).
UNREACHABLE = (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED)


class PeerCopies:
    """Finds nodes whose SSD holds a component and streams it from their instance managers."""

    def __init__(self, coordinator: coordinator_pb2_grpc.CacheCoordinatorServiceStub, node_id: str) -> None:
        self.coordinator = coordinator
        self.node_id = node_id
        self._addresses: dict[str, str] = {}
        self._unreachable: dict[str, float] = {}
        self._channels: dict[str, tuple[aio.Channel, instance_manager_pb2_grpc.InstanceManagerServiceStub]] = {}

    async def holders(self, component_id: str) -> list[tuple[str, str]]:
        """``(node_id, instance manager address)`` of the other live nodes whose SSD holds ``component_id``,
        most recently used copy first."""
        resp = await self.coordinator.Locate(
            coordinator_pb2.LocateRequest(component_ids=[component_id]), timeout=RPC_TIMEOUT_S
        )
        copies = [
            r
            for loc in resp.locations
            for r in loc.residencies
            if r.tier == common_pb2.TIER_SSD and r.node_id != self.node_id and not r.worker_id
        ]
        copies.sort(key=lambda r: -r.last_used_unix)
        nodes = list(dict.fromkeys(r.node_id for r in copies))
        if any(n not in self._addresses for n in nodes):
            await self._refresh_addresses()
        now = time.monotonic()
        found = [(n, self._addresses[n]) for n in nodes if n in self._addresses]
        return [(n, a) for n, a in found if self._unreachable.get(a, 0.0) <= now]

    async def _refresh_addresses(self) -> None:
        resp = await self.coordinator.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=RPC_TIMEOUT_S)
        self._addresses = {n.node_id: n.instance_manager_address for n in resp.nodes if n.instance_manager_address}

    def _stub(self, address: str) -> instance_manager_pb2_grpc.InstanceManagerServiceStub:
        pair = self._channels.get(address)
        if pair is None:
            channel = open_channel(address)
            pair = (channel, instance_manager_pb2_grpc.InstanceManagerServiceStub(channel))
            self._channels[address] = pair
        return pair[1]

    async def read(self, address: str, rec: common_pb2.Component, dest: Path) -> tuple[int, bool]:
        """Streams ``rec``'s artifact from the instance manager at ``address`` to ``dest`` (which must not exist)
        and checks it against ``rec.sha256``; returns (bytes, is_dir). DATA_LOSS on a mismatch or a malformed
        stream; the peer's own errors (NOT_FOUND, UNAVAILABLE, ...) propagate."""
        timeout = STREAM_BASE_S + max(0, rec.bytes) / MIN_PEER_BPS
        call = self._stub(address).ReadArtifact(
            instance_manager_pb2.ReadArtifactRequest(component_id=rec.id), timeout=timeout
        )
        writer: ArtifactWriter | None = None
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(call.read(), CHUNK_TIMEOUT_S)
                except TimeoutError:
                    self._unreachable[address] = time.monotonic() + UNREACHABLE_BACKOFF_S
                    raise
                except aio.AioRpcError as exc:
                    if exc.code() in UNREACHABLE:
                        self._unreachable[address] = time.monotonic() + UNREACHABLE_BACKOFF_S
                    raise
                if chunk is aio.EOF:
                    break
                assert isinstance(chunk, instance_manager_pb2.ReadArtifactResponse)
                if writer is None:
                    writer = ArtifactWriter(rec.id, dest, chunk.is_dir)
                await asyncio.to_thread(writer.write, chunk)
            if writer is None:
                raise DataLoss(f"component {rec.id!r}: the peer at {address} sent no data; nothing was published")
            digest, size = await asyncio.to_thread(writer.finish)
        finally:
            call.cancel()
            if writer is not None:
                await asyncio.to_thread(writer.close)
        if digest != rec.sha256.lower():
            raise DataLoss(
                f"component {rec.id!r}: the copy from the peer at {address} hashes to {digest}, the catalog has "
                f"{rec.sha256}; nothing was published"
            )
        return size, writer.is_dir

    async def close(self) -> None:
        """Closes the channels to peers."""
        channels = [c for c, _ in self._channels.values()]
        self._channels.clear()
        for channel in channels:
            await channel.close()


class ArtifactWriter:
    """Writes a ``ReadArtifact`` stream to ``dest`` (a file, or a folder of files), hashing as it goes.

    The stream must be well formed: for a file artifact one file with an empty path; for a
    folder relative paths inside it (no ``..``, no absolute path, no pickle checkpoint),
    each file once; chunks of a file in order without gaps, ending at its size. Anything
    else is DATA_LOSS. Blocking: run its methods in a worker thread.
    """

    def __init__(self, component_id: str, dest: Path, is_dir: bool) -> None:
        self.component_id = component_id
        self.dest = dest
        self.is_dir = is_dir
        self._digests: list[tuple[str, str]] = []
        self._file: BinaryIO | None = None
        self._rel = ""
        self._hash = hashlib.sha256()
        self._written = 0
        self._size = 0
        self._total = 0
        self._dirs: set[Path] = set()
        if is_dir:
            dest.mkdir(parents=True)
            self._dirs.add(dest)

    def _bad(self, why: str) -> DataLoss:
        return DataLoss(f"component {self.component_id!r}: malformed peer stream ({why}); nothing was published")

    def write(self, chunk: instance_manager_pb2.ReadArtifactResponse) -> None:
        """Appends one chunk (opening its file when it is the first of a new one)."""
        if chunk.is_dir != self.is_dir:
            raise self._bad("is_dir changed mid-stream")
        if self._file is None or chunk.relpath != self._rel:
            self._end_file()
            self._open(chunk.relpath, chunk.file_bytes)
        if chunk.offset != self._written or chunk.file_bytes != self._size:
            raise self._bad(f"{chunk.relpath or 'the file'}: chunk at {chunk.offset}, expected {self._written}")
        if self._written + len(chunk.data) > self._size:
            raise self._bad(f"{chunk.relpath or 'the file'}: more than its {self._size} bytes")
        assert self._file is not None
        self._file.write(chunk.data)
        self._hash.update(chunk.data)
        self._written += len(chunk.data)

    def _open(self, rel: str, size: int) -> None:
        if self.is_dir:
            path = PurePosixPath(rel)
            if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel or is_pickle_path(rel):
                raise self._bad(f"file path {rel!r} is not a plain relative path")
            if any(r == rel for r, _ in self._digests):
                raise self._bad(f"{rel!r} sent twice")
            out = self.dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(out.parent)
        else:
            if rel or self._digests:
                raise self._bad("a file artifact is one file without a path")
            out = self.dest
        if size < 0:
            raise self._bad(f"negative size {size}")
        self._file = open(out, "wb")  # closed in _end_file, or in close after a failure
        self._rel, self._size, self._written, self._hash = rel, size, 0, hashlib.sha256()

    def _end_file(self) -> None:
        if self._file is None:
            return
        if self._written != self._size:
            raise self._bad(f"{self._rel or 'the file'} ended after {self._written} of {self._size} bytes")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self._digests.append((self._rel, self._hash.hexdigest()))
        self._total += self._size

    def finish(self) -> tuple[str, int]:
        """Ends the last file; returns the artifact's digest (a folder's from its files) and its bytes."""
        self._end_file()
        for d in self._dirs:
            fsync_dir(d)
        digest = folder_digest_from(self._digests) if self.is_dir else self._digests[0][1]
        return digest, self._total

    def close(self) -> None:
        """Closes an open file (after a failure; the caller discards ``dest``)."""
        if self._file is not None:
            self._file.close()
            self._file = None


PEER_LABEL = "PEER"
"""What spans and logs call a copy that came from a peer (not a :class:`~diffmesh.tiers.Tier`: the
residency of such a copy is SSD, and the wire ``Tier`` enum has no PEER value)."""
