"""diffmesh cache coordinator: the catalog and the global view of where components live, in Redis.

Torch-free: it imports and serves without torch installed.
"""

__version__ = "0.1.0"
