"""Trace-driven discrete-event simulator comparing diffmesh with baseline serving systems."""
