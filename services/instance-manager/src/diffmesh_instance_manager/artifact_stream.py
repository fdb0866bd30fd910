"""The PEER tier, serving side: the ``ReadArtifact`` stream of one verified SSD copy.

Only copies in the SSD index are served: they were checked against the catalog digest
when they arrived (or derived and hashed here), so a peer never passes on bytes this node
has not verified. A folder artifact goes file by file in path order, each in chunks of
:data:`CHUNK_BYTES`. While the stream runs the copy counts as being read, so it is not
evicted under the reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from diffmesh.artifacts import folder_files
from diffmesh.errors import NotFound
from diffmesh.v1 import instance_manager_pb2

from diffmesh_instance_manager.ssd_tier import SsdTier

CHUNK_BYTES = 1024 * 1024


async def artifact_chunks(ssd: SsdTier, component_id: str) -> AsyncIterator[instance_manager_pb2.ReadArtifactResponse]:
    """The chunks of ``component_id``'s SSD copy; NOT_FOUND naming the id when this node's SSD index lacks it."""
    entry = ssd.entries.get(component_id)
    if entry is None:
        raise NotFound("verified SSD copy of component", component_id)
    with ssd.reading(component_id):
        root = ssd.path(entry)
        if entry.is_dir:
            files = await asyncio.to_thread(lambda: [(f.relative_to(root).as_posix(), f) for f in folder_files(root)])
        else:
            files = [("", root)]
        for rel, path in files:
            async for chunk in _file_chunks(path, rel, entry.is_dir, entry.sha256):
                yield chunk


async def _file_chunks(
    path: Path, rel: str, is_dir: bool, sha256: str
) -> AsyncIterator[instance_manager_pb2.ReadArtifactResponse]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        size = await asyncio.to_thread(lambda: Path(path).stat().st_size)
        offset = 0
        while True:
            data = await asyncio.to_thread(f.read, CHUNK_BYTES)
            if not data and offset > 0:
                break
            yield instance_manager_pb2.ReadArtifactResponse(
                relpath=rel, offset=offset, data=data, file_bytes=size, is_dir=is_dir, sha256=sha256
            )
            offset += len(data)
            if not data or offset >= size:
                break
    finally:
        await asyncio.to_thread(f.close)
