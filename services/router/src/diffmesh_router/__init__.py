"""diffmesh router: the public gRPC API (validation, placement, forwarding, request records)."""
