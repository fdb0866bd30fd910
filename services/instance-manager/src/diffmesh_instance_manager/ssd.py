"""SSD tier: a cache directory of verified artifacts plus a JSON index that survives restarts.

Layout under ``root``::

    objects/<sha256[:16]>_<component id>   the artifact (a file or a folder), published by rename
    tmp/                                   fetches in progress (emptied at start: never published)
    index.json                             {"entries": [SsdEntry...]}, replaced atomically

Methods are blocking (run them in threads); the in-memory ``entries`` dict is owned by the
event loop, which passes snapshots to :meth:`SsdCache.save_index`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from diffmesh_instance_manager.fetch_common import fsync_dir

log = logging.getLogger(__name__)


@dataclass
class SsdEntry:
    """One artifact in the SSD tier."""

    component_id: str
    sha256: str
    name: str
    bytes: int
    is_dir: bool
    kind: int
    last_used: float


class SsdCache:
    """The cache directory (filesystem side only; capacity is enforced by the store)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.index_path = root / "index.json"
        self._index_lock = threading.Lock()
        self._written_seq = -1

    def open(self) -> dict[str, SsdEntry]:
        """Creates the layout, drops unfinished fetches and orphans, returns the surviving index."""
        self.objects.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        entries: dict[str, SsdEntry] = {}
        if self.index_path.exists():
            try:
                doc = json.loads(self.index_path.read_text())
                for raw in doc.get("entries", []):
                    entry = SsdEntry(**raw)
                    if (self.objects / entry.name).exists():
                        entries[entry.component_id] = entry
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("ssd index unreadable; starting empty", extra={"error": str(exc)})
                entries = {}
        known = {e.name for e in entries.values()}
        for child in self.objects.iterdir():
            if child.name not in known:
                self._delete(child)
        self.save_index(list(entries.values()), seq=0)
        return entries

    def path(self, entry: SsdEntry) -> Path:
        """Where ``entry``'s artifact lives."""
        return self.objects / entry.name

    def tmp_path(self, component_id: str) -> Path:
        """A fresh temporary path for a fetch of ``component_id``."""
        return self.tmp / f"{uuid.uuid4().hex}_{component_id}"

    def publish(self, tmp: Path, entry: SsdEntry) -> None:
        """Atomically moves a verified fetch into place (replacing an older copy)."""
        final = self.objects / entry.name
        if final.exists():
            self._delete(final)
        os.rename(tmp, final)
        fsync_dir(self.objects)

    def discard(self, path: Path) -> None:
        """Removes a temporary fetch or an evicted artifact."""
        self._delete(path)

    def save_index(self, entries: list[SsdEntry], seq: int) -> None:
        """Writes the index atomically; an older snapshot (lower ``seq``) never overwrites a newer one."""
        with self._index_lock:
            if seq < self._written_seq:
                return
            tmp = self.root / f".index.{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps({"entries": [asdict(e) for e in entries]}, indent=1))
            os.rename(tmp, self.index_path)
            self._written_seq = seq

    @staticmethod
    def _delete(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def entry_name(component_id: str, sha256: str) -> str:
    """Directory-entry name of an artifact (the digest prefix keeps ids like ``..`` harmless)."""
    return f"{sha256[:16]}_{component_id}"
