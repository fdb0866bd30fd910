"""direct_io.read_into: O_DIRECT on a real disk file, the buffered fallback, tails, errors."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffmesh.errors import DataLoss
from diffmesh_instance_manager.direct_io import ALIGN, DirectLoader, TruncatedFile, buffer_address, read_into

REPO = Path(__file__).resolve().parents[2]
CHUNK = 64 * 1024


def _fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _accepts_o_direct(directory: Path) -> bool:
    probe = directory / f".odirect-probe-{os.getpid()}"
    probe.write_bytes(b"x")
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        probe.unlink()
    os.close(fd)
    return True


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on a disk filesystem that accepts O_DIRECT (pytest's tmp dir, else the repo's .diffmesh)."""
    d = tmp_path_factory.mktemp("direct-io")
    if _fs_type(d) not in ("tmpfs", "ramfs") and _accepts_o_direct(d):
        yield d
        return
    (REPO / ".diffmesh").mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="direct-io-test-", dir=REPO / ".diffmesh"))
    try:
        if _fs_type(d) in ("tmpfs", "ramfs") or not _accepts_o_direct(d):
            pytest.skip("no disk filesystem that accepts O_DIRECT")
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture(scope="module")
def refusing_dir() -> Iterator[Path]:
    """A directory whose filesystem refuses O_DIRECT with EINVAL.

    /dev/shm did so before Linux 6.6; newer kernels' tmpfs accepts O_DIRECT, so as root a
    private ramfs (which never supports it) is mounted instead.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and not _accepts_o_direct(shm):
        d = shm / f"direct-io-test-{os.getpid()}"
        d.mkdir()
        yield d
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
        return
    d = Path(f"/tmp/direct-io-ramfs-{os.getpid()}")
    d.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "ramfs", "ramfs", str(d)], capture_output=True).returncode == 0
    if not mounted:
        d.rmdir()
        pytest.skip("no filesystem refusing O_DIRECT is available (tmpfs accepts it and ramfs cannot be mounted)")
    try:
        assert not _accepts_o_direct(d)
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)
        d.rmdir()


def _pattern(n: int, seed: int = 7) -> bytes:
    return bytes((i * 31 + seed + (i >> 12)) % 251 for i in range(n))


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, max(n, 1))


@pytest.mark.parametrize(
    "size",
    [0, 1, ALIGN - 1, ALIGN, CHUNK, CHUNK + 1, 5 * CHUNK + 3 * ALIGN + 17],
)
def test_o_direct_reads_whole_file_in_place(disk_dir: Path, size: int) -> None:
    data = _pattern(size)
    path = disk_dir / f"f{size}.bin"
    path.write_bytes(data)
    buf = _aligned(size + ALIGN)  # room for the rounded-up tail: every read lands in place
    view = memoryview(buf)
    assert buffer_address(view) % ALIGN == 0
    result = read_into(path, view, chunk_size=CHUNK, threads=4)
    assert result.direct is True
    assert result.bytes_read == size
    assert bytes(view[:size]) == data
    view.release()
    buf.close()


def test_unaligned_destination_uses_bounce_buffers(disk_dir: Path) -> None:
    size = 3 * CHUNK + 1234
    data = _pattern(size, seed=3)
    path = disk_dir / "unaligned.bin"
    path.write_bytes(data)
    buf = bytearray(size + 1)
    dest = memoryview(buf)[1:]  # bytearray + 1: not page aligned
    result = read_into(path, dest, chunk_size=CHUNK, threads=3)
    assert result.direct is True
    assert bytes(dest) == data
    assert buf[0] == 0


def test_exact_size_destination_bounces_only_the_tail(disk_dir: Path) -> None:
    size = 2 * CHUNK + 100
    data = _pattern(size, seed=5)
    path = disk_dir / "exact.bin"
    path.write_bytes(data)
    buf = _aligned(size + ALIGN)
    buf[size : size + 10] = b"\xee" * 10  # must survive: the destination ends at ``size``
    view = memoryview(buf)
    result = read_into(path, view[:size], chunk_size=CHUNK, threads=2)
    assert result.direct is True
    assert bytes(view[:size]) == data
    assert bytes(view[size : size + 10]) == b"\xee" * 10
    view.release()
    buf.close()


def test_length_reads_a_prefix_and_progress_reaches_the_total(disk_dir: Path) -> None:
    data = _pattern(4 * CHUNK)
    path = disk_dir / "prefix.bin"
    path.write_bytes(data)
    length = 2 * CHUNK + 10
    dest = bytearray(length)
    seen: list[tuple[int, int]] = []
    result = read_into(
        path, memoryview(dest), chunk_size=CHUNK, threads=2, length=length, progress=lambda d, t: seen.append((d, t))
    )
    assert result.bytes_read == length
    assert bytes(dest) == data[:length]
    assert len(seen) == 3
    assert max(d for d, _ in seen) == length
    assert {t for _, t in seen} == {length}


def test_writes_are_visible_to_o_direct_reads_without_fsync(disk_dir: Path) -> None:
    # Dirty page-cache pages are written back before a direct read of the same range.
    path = disk_dir / "dirty.bin"
    path.write_bytes(_pattern(CHUNK, seed=1))
    with open(path, "r+b") as f:
        f.write(b"fresh bytes")
    dest = bytearray(CHUNK)
    assert read_into(path, memoryview(dest), chunk_size=CHUNK).direct
    assert bytes(dest[:11]) == b"fresh bytes"


def test_buffered_fallback_on_a_filesystem_that_refuses_o_direct(refusing_dir: Path) -> None:
    size = 3 * CHUNK + 77
    data = _pattern(size, seed=9)
    path = refusing_dir / "model.safetensors"
    path.write_bytes(data)
    buf = _aligned(size)
    view = memoryview(buf)
    result = read_into(path, view, chunk_size=CHUNK, threads=4)
    assert result.direct is False
    assert bytes(view[:size]) == data
    with pytest.raises(OSError) as info:
        read_into(path, view, chunk_size=CHUNK, direct=True)
    assert info.value.errno == errno.EINVAL
    view.release()
    buf.close()


def test_forced_buffered_mode_reads_from_dev_shm() -> None:
    path = Path("/dev/shm") / f"direct-io-test-{os.getpid()}.bin"
    data = _pattern(CHUNK + 5)
    path.write_bytes(data)
    try:
        dest = bytearray(len(data))
        result = read_into(path, memoryview(dest), chunk_size=ALIGN, threads=3, direct=False)
        assert result.direct is False
        assert bytes(dest) == data
        auto = bytearray(len(data))
        read_into(path, memoryview(auto), chunk_size=ALIGN)  # O_DIRECT or the fallback, whichever tmpfs allows
        assert bytes(auto) == data
    finally:
        path.unlink()


def test_bad_arguments_are_refused(disk_dir: Path) -> None:
    path = disk_dir / "small.bin"
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="destination has 2 bytes"):
        read_into(path, memoryview(bytearray(2)))
    with pytest.raises(ValueError, match="read-only"):
        read_into(path, memoryview(b"xxxx"))
    with pytest.raises(ValueError, match="multiple of 4096"):
        read_into(path, memoryview(bytearray(3)), chunk_size=1000)
    with pytest.raises(ValueError, match="threads"):
        read_into(path, memoryview(bytearray(3)), threads=0)
    with pytest.raises(TruncatedFile, match="fewer than the 10"):
        read_into(path, memoryview(bytearray(10)), length=10)
    with pytest.raises(FileNotFoundError):
        read_into(disk_dir / "missing.bin", memoryview(bytearray(3)))
    # Still works after the errors.
    dest = bytearray(3)
    read_into(path, memoryview(dest))
    assert dest == b"abc"


def test_loader_maps_a_short_file_to_data_loss_and_counts_bytes(disk_dir: Path) -> None:
    data = _pattern(CHUNK + 3)
    path = disk_dir / "loader.bin"
    path.write_bytes(data)
    loader = DirectLoader(threads=2, chunk_size=CHUNK)
    dest = bytearray(len(data))
    loader.read_into(path, memoryview(dest))
    assert bytes(dest) == data
    assert loader.bytes_read == len(data)
    assert loader.direct_reads == 1
    assert loader.buffered_reads == 0
    assert loader.gbps > 0
    with pytest.raises(DataLoss, match=r"loader\.bin"):
        loader.read_into(path, memoryview(bytearray(len(data) + 1)))
    assert loader.bytes_read == len(data)
