"""Local network helpers: a free port, and the handle of a running moto S3 server."""

from __future__ import annotations

import random
import socket

# Ports this module hands out: above Ray's worker ports (10002-19999 by default) and below the
# kernel's ephemeral range (Linux: /proc/sys/net/ipv4/ip_local_port_range, 32768 by default).
_LOW = 20000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free TCP port on 127.0.0.1, outside the kernel's ephemeral range.

    A port taken from that range (a bind to port 0) can be handed to any other bind to port 0
    or outgoing connection between this pick and the server's own bind, e.g. one of the Ray
    processes that `serve run` starts binding its gRPC server: a test's server then fails
    with "Failed to bind to address" (seen once in a full run). Outside that range only
    another explicit pick can take it.
    """
    high = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(100 if high - _LOW > 1000 else 0):
        port = rng.randrange(_LOW, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # an unusual port range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A running moto S3 server: endpoint URL plus fsspec/boto3 settings to reach it."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        self.key = "testing"
        self.secret = "testing"
        self.region = "us-east-1"

    @property
    def storage_options(self) -> dict:
        from imagebind_core.io import s3_storage_options

        return s3_storage_options(self.endpoint_url, self.region, self.key, self.secret)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name=self.region,
        )

    def filesystem(self):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        return s3fs.S3FileSystem(
            key=self.key,
            secret=self.secret,
            endpoint_url=self.endpoint_url,
            client_kwargs={"region_name": self.region},
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name
