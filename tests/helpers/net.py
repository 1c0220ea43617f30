"""Local network helpers: a free port, and the handle of a running moto S3 server."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
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
