"""Read a whole file into a caller-provided writable buffer, bypassing the page cache.

The SSD → HOST path of the instance manager: :func:`read_into` reads a file with
``O_DIRECT`` in aligned chunks (2 MiB by default) with several ``preadv`` calls in flight
(one thread each; ``os.preadv`` releases the GIL), straight into the destination (e.g. a
pool block of a shared-memory segment) when the destination is page-aligned, else through
page-aligned ``mmap`` bounce buffers. Single-threaded ``O_DIRECT`` is latency-bound on
virtio disks; several reads in flight are what reach the disk's bandwidth.

Where the filesystem refuses ``O_DIRECT`` (tmpfs answers ``EINVAL``, at ``open`` or at the
first read) it falls back to ordinary buffered reads, chosen automatically; the result
says which mode was used.

The unaligned tail (a file size is rarely a multiple of the alignment) is read with an
aligned length — ``O_DIRECT`` returns a short count at end of file — into the destination
when it has room for the rounded-up length, else into a bounce buffer and copied.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Alignment of file offsets, lengths and memory addresses for ``O_DIRECT``. 4 KiB covers
#: every logical block size in practice (512 B and 4 KiB devices).
ALIGN = 4096
#: Default chunk size of one read: 2 MiB (the pool's block granularity).
DEFAULT_CHUNK = 2 * 1024 * 1024
#: Default number of reads in flight (measured on this project's virtio disk: 1 thread
#: reaches ~0.7 GB/s, 4-16 reach the device limit).
DEFAULT_THREADS = 8

ProgressCallback = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``; called from reader threads, at most once per chunk."""


@dataclass(frozen=True)
class ReadResult:
    """Outcome of :func:`read_into`."""

    bytes_read: int
    seconds: float
    direct: bool
    """True when ``O_DIRECT`` was used, False for the buffered fallback."""

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (1 GB = 1e9 bytes)."""
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def buffer_address(buf: memoryview) -> int:
    """The address of the first byte of a writable, C-contiguous buffer."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class TruncatedFile(OSError):
    """The file holds fewer bytes than were to be read (it is shorter, or shrank while being read)."""


class _DirectRefused(Exception):
    """``O_DIRECT`` read refused by the filesystem after open succeeded."""


def _open(path: Path, direct: bool) -> int:
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if direct:
        flags |= os.O_DIRECT
    return os.open(path, flags)


def read_into(
    path: str | os.PathLike[str],
    dest: memoryview,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    threads: int = DEFAULT_THREADS,
    direct: bool | None = None,
    progress: ProgressCallback | None = None,
    length: int | None = None,
) -> ReadResult:
    """Reads the first ``length`` bytes (default: all) of the file at ``path`` into ``dest[:length]``.

    ``dest`` must be a writable, byte-format, C-contiguous memoryview at least ``length``
    bytes long (a shared-memory block, a ``bytearray``…); when it is page-aligned and
    has room for the length rounded up to 4 KiB, every read lands in place, otherwise the
    last (or every) chunk goes through a bounce buffer. An in-place ``O_DIRECT`` read may
    overwrite ``dest`` beyond ``length`` up to the next 4 KiB boundary (never beyond
    ``len(dest)``). ``chunk_size`` must be a positive
    multiple of :data:`ALIGN`. ``direct``: None = try ``O_DIRECT`` and fall back to
    buffered reads when the filesystem refuses it; True = require ``O_DIRECT`` (the
    ``OSError`` propagates); False = buffered only. Returns bytes read, wall seconds and
    the mode used. Raises ``ValueError`` when ``dest`` is too small or read-only,
    :class:`TruncatedFile` when the file holds fewer than ``length`` bytes, and
    ``OSError`` for other I/O errors.
    """
    if chunk_size <= 0 or chunk_size % ALIGN:
        raise ValueError(f"chunk_size must be a positive multiple of {ALIGN}, got {chunk_size}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    dest = dest.cast("B") if dest.format != "B" or dest.ndim != 1 else dest
    if dest.readonly:
        raise ValueError("destination buffer is read-only")
    p = Path(path)
    start = time.perf_counter()
    file_size = p.stat().st_size
    size = file_size if length is None else length
    if size < 0:
        raise ValueError(f"length must be >= 0, got {size}")
    if file_size < size:
        raise TruncatedFile(errno.EIO, f"{p} has {file_size} bytes, fewer than the {size} to read")
    if len(dest) < size:
        raise ValueError(f"destination has {len(dest)} bytes, fewer than the {size} to read from {p}")
    if direct is not False:
        try:
            fd = _open(p, True)
        except OSError as exc:
            if direct or exc.errno != errno.EINVAL:
                raise
        else:
            try:
                _read_chunks(fd, dest, size, chunk_size, threads, True, progress)
                return ReadResult(size, time.perf_counter() - start, True)
            except _DirectRefused:
                if direct:
                    raise OSError(errno.EINVAL, f"O_DIRECT read refused for {p}") from None
            finally:
                os.close(fd)
    fd = _open(p, False)
    try:
        _read_chunks(fd, dest, size, chunk_size, threads, False, progress)
    finally:
        os.close(fd)
    return ReadResult(size, time.perf_counter() - start, False)


def _read_chunks(
    fd: int,
    dest: memoryview,
    size: int,
    chunk_size: int,
    threads: int,
    direct: bool,
    progress: ProgressCallback | None,
) -> None:
    """Reads ``size`` bytes of ``fd`` into ``dest`` with ``threads`` workers claiming chunks in order."""
    if size == 0:
        return
    n_chunks = (size + chunk_size - 1) // chunk_size
    aligned_dest = direct and buffer_address(dest) % ALIGN == 0
    # With an aligned destination, a chunk is read in place when its rounded-up length fits.
    room = len(dest)
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    errors: list[BaseException] = []

    def claim() -> int | None:
        with lock:
            if errors or state["next"] >= n_chunks:
                return None
            i = state["next"]
            state["next"] = i + 1
            return i

    def worker() -> None:
        bounce: mmap.mmap | None = None
        try:
            while (i := claim()) is not None:
                off = i * chunk_size
                want = min(chunk_size, size - off)
                if not direct:
                    _pread_full(fd, dest[off : off + want], off, want, direct=False)
                else:
                    length = _round_up(want, ALIGN)
                    if aligned_dest and off + length <= room:
                        _pread_full(fd, dest[off : off + length], off, want, direct=True)
                    else:
                        if bounce is None:
                            bounce = mmap.mmap(-1, chunk_size)  # anonymous mmap: page-aligned
                        view = memoryview(bounce)
                        try:
                            _pread_full(fd, view[:length], off, want, direct=True)
                            dest[off : off + want] = view[:want]
                        finally:
                            view.release()
                with lock:
                    state["done"] += want
                    done = state["done"]
                if progress is not None:
                    progress(done, size)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            with lock:
                errors.append(exc)
        finally:
            if bounce is not None:
                bounce.close()

    n_threads = min(threads, n_chunks)
    if n_threads == 1:
        worker()
    else:
        pool = [threading.Thread(target=worker, name=f"direct-io-{k}", daemon=True) for k in range(n_threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    if errors:
        # One refusal means O_DIRECT does not work here: fall back rather than report a side effect.
        raise next((e for e in errors if isinstance(e, _DirectRefused)), errors[0])


def _pread_full(fd: int, buf: memoryview, offset: int, want: int, *, direct: bool) -> None:
    """Fills ``want`` bytes at ``offset`` into ``buf`` (whose length may be rounded up for O_DIRECT)."""
    got = 0
    while got < want:
        try:
            n = os.preadv(fd, [buf[got:]], offset + got)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise _DirectRefused() from exc
            raise
        if n == 0:
            raise TruncatedFile(errno.EIO, f"unexpected end of file at offset {offset + got} ({want - got} more bytes expected)")
        got += n
        if direct and got < want and got % ALIGN:
            # A short O_DIRECT read that is not block-aligned cannot be continued in place.
            raise OSError(errno.EIO, f"short unaligned O_DIRECT read at offset {offset}: {got} of {want} bytes")


class DirectLoader:
    """``host.FileLoader`` implementation: :func:`read_into` with counters for ``Stats``.

    ``direct`` as in :func:`read_into` (None = automatic fallback). Thread-safe; the
    counters cover every call.
    """

    def __init__(self, *, threads: int = DEFAULT_THREADS, chunk_size: int = DEFAULT_CHUNK, direct: bool | None = None) -> None:
        self.threads = threads
        self.chunk_size = chunk_size
        self.direct = direct
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.seconds = 0.0
        self.direct_reads = 0
        self.buffered_reads = 0
        self.direct_bytes = 0

    def read_into(self, path: Path, dest: memoryview, length: int | None = None) -> None:
        """Fills ``dest`` with the first ``length`` (default ``len(dest)``) bytes of ``path``; ``DataLoss`` if the file
        is shorter. With room in ``dest`` past ``length``, the unaligned tail is read in place too."""
        from diffmesh.errors import DataLoss

        n = len(dest) if length is None else length
        try:
            result = read_into(path, dest, chunk_size=self.chunk_size, threads=self.threads, direct=self.direct, length=n)
        except TruncatedFile as exc:
            raise DataLoss(f"{path}: {exc.strerror} while loading into shared memory") from None
        with self._lock:
            self.bytes_read += result.bytes_read
            self.seconds += result.seconds
            if result.direct:
                self.direct_reads += 1
                self.direct_bytes += result.bytes_read
            else:
                self.buffered_reads += 1

    @property
    def gbps(self) -> float:
        """Mean load bandwidth over every call so far (GB/s; 0.0 before the first)."""
        with self._lock:
            return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0
