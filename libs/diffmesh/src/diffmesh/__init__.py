"""diffmesh shared library.

Torch-free on import: generated stubs (``diffmesh.v1``), settings, telemetry, the gRPC
server bootstrap, the error model, policies, the simulator, the client SDK and the CLI.
"""

__version__ = "0.1.0"
