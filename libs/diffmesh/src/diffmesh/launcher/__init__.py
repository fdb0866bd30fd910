"""``diffmesh run``: the whole mesh as local processes, demo requests, a report and a clean stop.

:class:`~diffmesh.launcher.mesh.LocalMesh` is the reusable part (the end-to-end tests
start the mesh with it); :mod:`diffmesh.launcher.cli` is the command.
"""
