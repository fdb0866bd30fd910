"""diffmesh worker: builds diffusers pipelines from HOST-tier shared-memory handles and denoises."""
