"""Do Lance's commits lose an update when writers race? Local folder and S3 (moto's server).

    /work/main/.venv/bin/python benchmarks/check_lance_commit.py [--writers 8] [--rows 1000]

Lance commits a version by writing `_versions/<n>.manifest` only if it does not exist yet
(rename-if-absent on local disks, `PUT If-None-Match: *` on S3); a writer that loses retries on
top of the winner or fails with a conflict. Without a working conditional put, two writers of
the same version would both "succeed" and one update would be silently lost.

For each store: create a dataset of `--rows` rows, then `--writers` threads, each from its own
handle opened at version 1, commit at the same time (half append one row, half delete one
distinct existing row). Afterwards every committed change must be visible: rows = rows +
appends - deletes over the successful writers, and the version count = 1 + successes. Errors
(conflicts) are allowed and counted; lost updates are not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pyarrow as pa
from _common import free_port


def race(uri: str, storage_options: dict | None, rows: int, writers: int) -> dict:
    import lance

    base = pa.table({"id": [f"r{i}" for i in range(rows)], "x": list(range(rows))})
    lance.write_dataset(base, uri, mode="create", storage_options=storage_options)
    handles = [lance.dataset(uri, storage_options=storage_options) for _ in range(writers)]
    barrier = threading.Barrier(writers)
    outcome: list[tuple[str, str | None]] = [("", None)] * writers

    def work(k: int) -> None:
        kind = "append" if k % 2 == 0 else "delete"
        barrier.wait()
        try:
            if kind == "append":
                lance.write_dataset(
                    pa.table({"id": [f"new{k}"], "x": [-k]}),
                    handles[k],
                    mode="append",
                    storage_options=storage_options,
                )
            else:
                handles[k].delete(f"id = 'r{k}'")
            outcome[k] = (kind, None)
        except Exception as e:  # a conflict is an allowed outcome; a lost update is not
            outcome[k] = (kind, f"{type(e).__name__}: {e}"[:200])

    ts = [threading.Thread(target=work, args=(k,)) for k in range(writers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    ds = lance.dataset(uri, storage_options=storage_options)
    ok_app = sum(1 for kind, err in outcome if kind == "append" and err is None)
    ok_del = sum(1 for kind, err in outcome if kind == "delete" and err is None)
    expected_rows = rows + ok_app - ok_del
    got = ds.count_rows()
    versions = len(ds.versions())
    return {
        "writers": writers,
        "succeeded": ok_app + ok_del,
        "errors": [e for _, e in outcome if e],
        "rows": got,
        "expected_rows": expected_rows,
        "versions": versions,
        "expected_versions": 1 + ok_app + ok_del,
        "no_lost_update": got == expected_rows and versions == 1 + ok_app + ok_del,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--rows", type=int, default=1000)
    a = p.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["local"] = race(f"{tmp}/t.lance", None, a.rows, a.writers)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket="lance")
        storage_options = {
            "aws_endpoint": url,
            "aws_region": "us-east-1",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "allow_http": "true",
        }
        out["s3_moto"] = race("s3://lance/t.lance", storage_options, a.rows, a.writers)
    finally:
        server.terminate()
        server.wait()
    print(json.dumps(out, indent=2))
    return 0 if all(r["no_lost_update"] for r in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
