"""Generated protobuf/gRPC stubs of package ``diffmesh.v1`` (built by ``make proto``, never committed)."""
