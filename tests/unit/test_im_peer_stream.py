"""The PEER tier's stream, receiving side: a ReadArtifact stream written to disk and hashed,
and every malformed stream refused as DATA_LOSS."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffmesh.artifacts import artifact_sha256
from diffmesh.errors import DataLoss
from diffmesh.v1.instance_manager_pb2 import ReadArtifactResponse
from diffmesh_instance_manager.peer_fetch import ArtifactWriter


def _chunks(rel: str, data: bytes, size: int = 3, is_dir: bool = True) -> list[ReadArtifactResponse]:
    parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    out, offset = [], 0
    for part in parts:
        out.append(ReadArtifactResponse(relpath=rel, offset=offset, data=part, file_bytes=len(data), is_dir=is_dir))
        offset += len(part)
    return out


def _write(dest: Path, chunks: list[ReadArtifactResponse]) -> tuple[str, int]:
    writer = ArtifactWriter("c", dest, chunks[0].is_dir)
    try:
        for chunk in chunks:
            writer.write(chunk)
        return writer.finish()
    finally:
        writer.close()


def test_a_folder_stream_is_written_and_hashed_like_the_folder(tmp_path: Path) -> None:
    files = {"model_index.json": b"{}", "unet/w.safetensors": b"0123456789", "empty.txt": b""}
    chunks = [c for rel, data in sorted(files.items()) for c in _chunks(rel, data)]
    digest, size = _write(tmp_path / "out", chunks)
    assert size == 12
    out = tmp_path / "out"
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert digest == artifact_sha256(tmp_path / "out")


def test_a_file_stream_is_one_file(tmp_path: Path) -> None:
    digest, size = _write(tmp_path / "f.safetensors", _chunks("", b"abcdefg", is_dir=False))
    assert (tmp_path / "f.safetensors").read_bytes() == b"abcdefg" and size == 7
    assert digest == artifact_sha256(tmp_path / "f.safetensors")


@pytest.mark.parametrize(
    ("chunks", "needle"),
    [
        (_chunks("../escape.json", b"x"), "not a plain relative path"),
        (_chunks("/abs.json", b"x"), "not a plain relative path"),
        (_chunks("unet/model.bin", b"x"), "not a plain relative path"),
        (_chunks("a.json", b"abcdefghi")[::2], "expected 3"),  # a gap
        (_chunks("a.json", b"abcdef")[:1], "ended after 3 of 6"),  # cut short
        ([*_chunks("a.json", b"abc"), *_chunks("b.json", b"x"), *_chunks("a.json", b"abc")], "sent twice"),
        ([*_chunks("a.json", b"abc"), *_chunks("b.json", b"x", is_dir=False)], "is_dir changed"),
        ([ReadArtifactResponse(relpath="a.json", offset=0, data=b"abcd", file_bytes=3, is_dir=True)], "more than its 3 bytes"),
        (_chunks("named", b"abc", is_dir=False), "one file without a path"),
        (_chunks("", b"abc", is_dir=False) + _chunks("", b"abc", is_dir=False), "expected 3"),
    ],
)
def test_malformed_streams_are_data_loss(tmp_path: Path, chunks: list[ReadArtifactResponse], needle: str) -> None:
    with pytest.raises(DataLoss, match="malformed peer stream") as info:
        _write(tmp_path / "out", chunks)
    assert needle in str(info.value)
    assert not (tmp_path / "escape.json").exists()
