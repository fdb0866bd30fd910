"""Policies: pure code shared by the live services and the simulator.

No I/O and no clocks (time is an argument); deterministic for a seed. The simulator and
the services call the same objects, so a policy result on the trace is a claim about the
running system.
"""
