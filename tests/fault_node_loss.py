"""Run by tests/test_pipeline_faults.py in a subprocess: the embedding job on a Ray cluster of a
head and two worker nodes on this machine; once a shard is committed, one worker node that runs
some of the job's work is killed (no graceful shutdown). Writes a JSON report for the test."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from pipelines.config import load_config
from pipelines.embed import run_job

MB = 2**20


def committed(out: str) -> dict[str, str]:
    if not os.path.isdir(out):
        return {}
    return {
        n: open(os.path.join(out, n), "rb").read().hex()
        for n in os.listdir(out)
        if n.endswith(".parquet") and not n.startswith(("_", "."))
    }


def children(pid: int) -> list[int]:
    """Every descendant of `pid`."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def main() -> int:
    overrides, report_path = json.loads(sys.argv[1]), sys.argv[2]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 150 * MB},
    )
    workers = [cluster.add_node(num_cpus=2, object_store_memory=150 * MB) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = load_config(None, overrides)
    result: dict = {}

    def go() -> None:
        try:
            result["summary"] = run_job(cfg).to_dict()
        except BaseException as e:
            result["error"] = repr(e)

    job = threading.Thread(target=go, daemon=True)
    job.start()
    out = overrides["output"]
    deadline = time.time() + 240
    victim, work = None, []
    while time.time() < deadline and job.is_alive():
        if committed(out):
            # The worker node that runs job work now (an encoder actor or a map task).
            for node in workers:
                pid = node.all_processes["raylet"][0].process.pid
                work = [c for c in map(cmdline, children(pid)) if "MapBatches" in c or "Map" in c]
                if work:
                    victim = node
                    break
            if victim is not None:
                break
        time.sleep(0.1)
    report: dict = {"committed_before": committed(out)}
    trace = overrides["debug.trace_path"]
    report["trace_mark"] = os.path.getsize(trace) if os.path.exists(trace) else 0
    report["removed_node_had"] = work
    if victim is None:
        report["error"] = result.get("error", "no shard committed / no node with job work")
        with open(report_path, "w") as f:
            json.dump(report, f)
        print(report["error"], file=sys.stderr)
        return 1
    cluster.remove_node(victim, allow_graceful=False)
    job.join(360)
    report.update(result)
    with open(report_path, "w") as f:
        json.dump(report, f)
    if job.is_alive():
        print("the job did not finish after the node was lost", file=sys.stderr)
        return 1
    if "error" in result:
        print(f"the job failed after the node was lost: {result['error']}", file=sys.stderr)
        return 1
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
