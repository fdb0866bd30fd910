"""diffmesh instance manager: REMOTE → SSD → HOST (shared memory) loading, one per node."""
