"""A loopback S3 server for tests: moto's real HTTP server, so pyarrow's own S3 client talks to it as to AWS.

(In-process `mock_aws` patches botocore only; pyarrow's C++ client would go to the internet.)
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import uuid

ACCESS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """`python -m moto.server` on a free loopback port; `stop()` ends it."""

    def __init__(self, timeout: float = 20.0):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: moto logs every request and a full pipe blocks it
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self._process.returncode}:\n{self._tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto server did not answer on port {self.port} within {timeout:.0f} s:\n{self._tail()}")

    def _tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    @property
    def env(self) -> dict[str, str]:
        """The variables that point boto3 and pyarrow at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **ACCESS}

    def client(self):
        """A boto3 S3 client of this server (for what pyarrow will not do, e.g. a raw key with '..')."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=ACCESS["AWS_SECRET_ACCESS_KEY"],
            region_name=ACCESS["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self) -> str:
        """A new, empty bucket with a unique name; returns the name."""
        name = f"crystalae-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
