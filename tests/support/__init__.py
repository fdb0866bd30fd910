"""Test support: helpers shared by several test modules. Fixtures live in ``conftest.py`` files.

Test modules import helpers from here, never from another test module.

- :mod:`tests.support.waiting` — :func:`~tests.support.waiting.wait_for`, the one way a test
  waits: it polls a condition until it holds (tests never sleep for an outcome).
- :mod:`tests.support.im` — the instance manager's contract-test topology, :class:`ImMesh`
  (a coordinator on Redis and test artifacts registered with it), :class:`Im` (one running
  instance manager, started by :func:`start_im`) and the calls and checks its tests share.
- :mod:`tests.support.worker` — the worker's contract-test topology, :class:`WorkerMesh`
  (coordinator, instance manager and one CPU worker on the demo models) and its request helpers.
- :mod:`tests.support.shm_packing` — :class:`Packed`: components laid out in real POSIX shared
  memory the way the instance manager does it, so worker unit tests run without one.
- :mod:`tests.support.s3_server` and :mod:`tests.support.cutting_proxy` — a real S3 store
  (SeaweedFS) and a TCP proxy that counts requests and cuts transfers.

The router's topology (``RouterMesh``: coordinator and router, optionally with an instance
manager and workers) is used by ``tests/contract/test_router.py`` alone and lives there.

Fixtures: ``tests/conftest.py`` (session: Redis, S3, demo models, trace) and
``tests/contract/conftest.py`` (module-scoped ``im_mesh`` and ``worker_mesh``: each test
module that asks for one gets its own).
"""
