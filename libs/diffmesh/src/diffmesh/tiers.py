"""The one ``Tier`` of diffmesh: where a copy of a component lives.

Its values equal the proto enum ``diffmesh.v1.Tier``, so conversion at a gRPC edge is
``Tier(message.tier)`` one way and ``int(tier)`` the other. Pure code (no protobuf
import), so the policies and the simulator use it as they are.
"""

from __future__ import annotations

from enum import IntEnum


class Tier(IntEnum):
    """Where a copy lives, slowest first; values match ``diffmesh.v1.Tier``."""

    UNSPECIFIED = 0
    REMOTE = 1
    SSD = 2
    HOST = 3
    GPU = 4

    @property
    def label(self) -> str:
        """The short upper-case name (``"HOST"``), as tables and logs print it."""
        return self.name

    @classmethod
    def parse(cls, value: str | int) -> Tier:
        """A tier from its value, short name (``"ssd"``) or proto name (``"TIER_SSD"``)."""
        if isinstance(value, int):
            return cls(value)
        name = value.strip().upper().removeprefix("TIER_")
        try:
            return cls[name]
        except KeyError:
            raise ValueError(f"unknown tier {value!r}") from None


FASTEST_FIRST: tuple[Tier, ...] = (Tier.GPU, Tier.HOST, Tier.SSD, Tier.REMOTE)
"""The tiers a copy can be loaded from, cheapest first."""
