"""Offline bound on misses: Belady's MIN, size-aware variant ("Belady-Size").

The cluster's node caches are pooled into one cache of their total SSD capacity (any
policy that cannot share copies between nodes needs at least as many REMOTE fetches as a
single pooled cache). Components are requested in arrival order; on a miss the copy is
fetched and, when space is short, the cached copies with the largest ``bytes x distance
to next use`` go first (never-again copies first of all, largest first).
"""

from __future__ import annotations

from collections.abc import Sequence


def belady_size_misses(accesses: Sequence[int], nbytes: Sequence[int], capacity: int) -> int:
    """Misses of size-aware Belady over a sequence of component ids with sizes ``nbytes``."""
    n = len(accesses)
    next_use = [0] * n
    last: dict[int, int] = {}
    never = n + 1
    for i in range(n - 1, -1, -1):
        c = accesses[i]
        next_use[i] = last.get(c, never)
        last[c] = i
    cached: dict[int, int] = {}
    used = 0
    misses = 0
    for i, c in enumerate(accesses):
        if c in cached:
            cached[c] = next_use[i]
            continue
        misses += 1
        size = nbytes[c]
        if size > capacity:
            continue
        if used + size > capacity:
            order = sorted(cached, key=lambda k: -(nbytes[k] * (cached[k] - i) if cached[k] < never else never * nbytes[k] * 2))
            for k in order:
                if used + size <= capacity:
                    break
                used -= nbytes[k]
                del cached[k]
        cached[c] = next_use[i]
        used += size
    return misses
