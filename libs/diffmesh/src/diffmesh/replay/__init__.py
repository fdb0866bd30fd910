"""``diffmesh replay``: the trace replayed live through a local mesh, one fresh mesh per policy.

The pure parts (trace → catalog mapping, the request stream and its time compression,
the token bucket, the statistics) are separate from the parts that start processes, so
they are tested without a mesh. ``README.md`` in this folder says where every number of
the output comes from.
"""
