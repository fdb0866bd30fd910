"""Child processes of a local mesh: start, wait until SERVING, stop without orphans.

Every service runs as its own console script (``diffmesh-coordinator`` …) in its own
process group, with stdout and stderr going to ``<log_dir>/<name>.log``. Stopping sends
SIGTERM to the group (the service drains), waits, then SIGKILLs whatever is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffmesh.redis_server import free_port
from diffmesh.shm import SHM_DIR, SHM_PREFIX

__all__ = ["ChildProcess", "ServiceFailed", "ServiceSpec", "find_script", "free_port", "shm_segments"]


class ServiceFailed(RuntimeError):
    """A child service exited or did not become ready; the message carries its log tail."""


def find_script(name: str) -> str:
    """Path of a console script: next to ``sys.executable`` (the virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise ServiceFailed(f"console script {name!r} not found next to {sys.executable} or on PATH: run `make venv`")


def shm_segments() -> set[str]:
    """Names of the diffmesh shared-memory segments (``/dev/shm/dm_*``) that exist now."""
    try:
        return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(SHM_PREFIX)}
    except OSError:
        return set()


@dataclass
class ServiceSpec:
    """How to start one service: its name, console script, port and extra environment."""

    name: str
    script: str
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"


class ChildProcess:
    """One running service process, in its own process group, logging to a file."""

    def __init__(self, spec: ServiceSpec, log_dir: Path, base_env: Mapping[str, str]) -> None:
        self.spec = spec
        self.log_path = log_dir / f"{spec.name}.log"
        self._base_env = dict(base_env)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def name(self) -> str:
        """Service instance name (``worker-1`` …)."""
        return self.spec.name

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` the service listens on."""
        return self.spec.address

    @property
    def pid(self) -> int | None:
        """Process id once started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while running (or never started)."""
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        """True while the process runs."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> ChildProcess:
        """Starts the process (returns at once; see :meth:`wait_serving`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = {**self._base_env, **self.spec.env}
        self._proc = subprocess.Popen(
            [find_script(self.spec.script)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own process group: a terminal's Ctrl-C reaches only the launcher, which stops
            # the children in order, and the whole group can be killed at the end.
            start_new_session=True,
        )
        return self

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the service's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, what: str) -> ServiceFailed:
        """A :class:`ServiceFailed` for this service with its log tail."""
        return ServiceFailed(f"{self.name} {what}; log {self.log_path}, last lines:\n{self.log_tail()}")

    def wait_serving(self, timeout: float = 120.0) -> float:
        """Waits until the standard health service answers SERVING; returns the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.running():
                    raise self.failure(f"exited with status {self.returncode} before serving")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise self.failure(f"not SERVING on {self.address} after {timeout:.0f} s")
                time.sleep(0.2)

    def terminate(self) -> None:
        """Sends SIGTERM to the process group (the service starts draining); see :meth:`wait_stopped`."""
        if self._proc is not None and self._proc.poll() is None:
            _signal_group(self._proc.pid, signal.SIGTERM)

    def wait_stopped(self, grace: float = 15.0) -> list[str]:
        """Waits up to ``grace`` s for the exit, then SIGKILLs the group; returns the problems seen."""
        problems: list[str] = []
        proc = self._proc
        if proc is not None:
            pgid = proc.pid  # start_new_session: the child leads its own group
            if proc.returncode is None:
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    problems.append(f"{self.name} did not exit within {grace:.0f} s of SIGTERM; killed")
                    _signal_group(pgid, signal.SIGKILL)
                    proc.wait(10)
                if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
                    problems.append(f"{self.name} exited with status {proc.returncode} (log {self.log_path})")
            # Helpers of the service (e.g. multiprocessing's resource tracker) exit right after it.
            if not _wait_group_gone(pgid, 5.0):
                problems.append(f"{self.name} left processes behind in group {pgid}: {_group_members(pgid)}; killed")
                _signal_group(pgid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return problems

    def stop(self, grace: float = 15.0) -> list[str]:
        """SIGTERM to the process group, up to ``grace`` s to exit, then SIGKILL; returns problems seen."""
        self.terminate()
        return self.wait_stopped(grace)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _group_members(pgid: int) -> str:
    """``pid (command)`` of the processes in group ``pgid`` (from /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'
        comm = text[text.find("(") + 1 : text.rfind(")")]
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append(f"{stat.parent.name} ({comm})")
    return ", ".join(members) or "?"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
