"""The coordinator's view stream: which resume ids it still holds."""

from __future__ import annotations

import pytest
from diffmesh_coordinator.view_events import parse_id, stream_holds


def info(length: int, added: int, first: str | None, last: str, deleted: str = "0-0") -> dict[str, object]:
    return {
        "length": length,
        "entries-added": added,
        "first-entry": (first, {}) if first else None,
        "last-generated-id": last,
        "max-deleted-entry-id": deleted,
    }


def test_parse_id() -> None:
    assert parse_id("12-3") == (12, 3)
    assert parse_id("12-3") < parse_id("12-10")
    for bad in ("", "12", "a-1", "1-2-3", "-1-2"):
        with pytest.raises(ValueError):
            parse_id(bad)


def test_stream_holds() -> None:
    assert stream_holds("0-0", None) and not stream_holds("5-0", None)
    untrimmed = info(3, 3, "1-0", "3-0")
    assert all(stream_holds(i, untrimmed) for i in ("0-0", "1-0", "2-0", "3-0"))
    assert not stream_holds("4-0", untrimmed)  # another incarnation of the stream
    trimmed = info(2, 5, "4-0", "5-0")
    assert stream_holds("4-0", trimmed) and stream_holds("5-0", trimmed)
    assert not stream_holds("3-0", trimmed) and not stream_holds("1-0", trimmed)
    emptied = info(0, 5, None, "5-0")
    assert stream_holds("5-0", emptied) and not stream_holds("4-0", emptied)
    assert not stream_holds("2-0", info(3, 3, "1-0", "3-0", deleted="2-5"))
