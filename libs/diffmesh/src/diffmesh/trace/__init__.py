"""Workloads for the simulator: the production trace loader, a synthetic generator and workload facts."""
