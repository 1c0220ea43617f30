"""Faults while the embedding job runs: an encoder actor killed, the object store stopped and
started again, a worker node lost. Each time the job (or a rerun of it) completes with every
item exactly once, and nothing committed before the fault is recomputed or rewritten — shown
with the job's trace file (one line "<pid> <id>" per item preprocessed)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable

import pyarrow.parquet as pq
import pytest
from helpers.net import S3Server, free_port
from helpers.pipeline import read_output

from imagebind_core.errors import StoreUnavailable
from pipelines.config import load_config
from pipelines.embed import run_job

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

SLOW = {
    "preset": "tiny",
    "ray.progress_bars": False,
    # One item per task, slowly: the fault lands while most shards are still to do.
    "preprocess.num_cpus": 0.25,
    "preprocess.read_num_cpus": 0.1,
    "preprocess.batch_size": 1,
    "encoder_defaults.num_cpus": 0.25,
    "encoder_defaults.batch_size": 2,
    "encoder_defaults.max_actors": 1,
    "debug.delay_per_item_s": 0.3,
}


def _manifests(put: Callable[[str, bytes], None], shards: int, per: int) -> set[str]:
    ids = set()
    for s in range(shards):
        rows = ["id,modality,text"] + [
            f"s{s}-{i},text,caption {i} of shard {s}" for i in range(per)
        ]
        ids.update(f"s{s}-{i}" for i in range(per))
        put(f"shard-{s:02d}.csv", ("\n".join(rows) + "\n").encode())
    return ids


def _trace(path: str, start: int = 0) -> list[str]:
    """Ids preprocessed, from byte offset `start` of the trace file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        f.seek(start)
        return [ln.split(" ", 1)[1].strip() for ln in f.read().decode().splitlines() if ln.strip()]


def _local_committed(out: str) -> dict[str, bytes]:
    if not os.path.isdir(out):
        return {}
    return {
        n: open(os.path.join(out, n), "rb").read()
        for n in os.listdir(out)
        if n.endswith(".parquet") and not n.startswith(("_", "."))
    }


def _ids_of(blobs: dict[str, bytes]) -> set[str]:
    import io

    ids: set[str] = set()
    for b in blobs.values():
        ids.update(pq.read_table(io.BytesIO(b), columns=["id"]).column("id").to_pylist())
    return ids


def _wait(cond: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool]) -> None:
    deadline = time.time() + timeout
    while not cond():
        if not alive():
            pytest.fail(f"the job ended before {what}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


class _Job(threading.Thread):
    """run_job in a thread of this process (the session's Ray)."""

    def __init__(self, cfg) -> None:
        super().__init__(daemon=True)
        self.cfg, self.summary, self.error = cfg, None, None

    def run(self) -> None:
        try:
            self.summary = run_job(self.cfg)
        except BaseException as e:  # reported by the test
            self.error = e


def _descendants_named(marker: str) -> list[int]:
    """Pids of this process's descendants whose command line contains `marker` (only
    processes this test session started: Ray's workers are children of its raylet)."""
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker not in cmd:
            continue
        p, hops = pid, 0
        while p > 1 and hops < 20:
            try:
                with open(f"/proc/{p}/stat") as f:
                    p = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                break
            if p == me:
                found.append(pid)
                break
            hops += 1
    return found


# --------------------------------------------------------------------- encoder actor killed


@pytest.mark.slow
def test_encoder_actor_killed_mid_job(tmp_path, ray_session):
    corpus, out, trace = tmp_path / "man", tmp_path / "out", tmp_path / "trace.txt"
    corpus.mkdir()
    all_ids = _manifests(lambda n, b: (corpus / n).write_bytes(b), shards=6, per=3)
    cfg = load_config(
        None, {**SLOW, "input": str(corpus), "output": str(out), "debug.trace_path": str(trace)}
    )
    job = _Job(cfg)
    job.start()
    _wait(lambda: len(_local_committed(str(out))) >= 1, 240, "a shard commits", job.is_alive)
    pids = _descendants_named("EncodeBatch")
    assert pids, "no encoder actor process found"
    before = _local_committed(str(out))
    mark = os.path.getsize(trace)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    job.join(300)
    assert not job.is_alive(), "the job did not finish after its encoder actor was killed"
    assert job.error is None, f"the job failed: {job.error!r}"
    assert len(before) < 6, "the kill landed after the job's end"
    emb, err, _ = read_output(str(out))
    ids = emb.column("id").to_pylist()
    assert sorted(ids) == sorted(all_ids), "an item is missing or present twice"
    assert err.num_rows == 0, err.to_pylist()
    after = _local_committed(str(out))
    assert {n: after[n] for n in before} == before, "a committed file was rewritten"
    assert not (_ids_of(before) & set(_trace(str(trace), mark))), "committed work recomputed"


# --------------------------------------------------------------------- object store restart


class _Proxy:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:target. Stopping it closes the listening
    socket and every open connection: clients see resets, then connection refused. Pausing
    it (`paused.set()`) is a store that stops answering: connections are accepted and kept,
    and nothing comes back until `paused.clear()`."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.paused = threading.Event()  # set: connections open, no bytes pass either way
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.paused.is_set():  # held, not dropped: the peer waits
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.sock.close()
        with self.lock:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self.conns.clear()


def _moto(port: int, recording: str) -> subprocess.Popen:
    env = {**os.environ, "MOTO_ENABLE_RECORDING": "True", "MOTO_RECORDER_FILEPATH": recording}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)


class _FrontedStore:
    """A recording moto server behind a `_Proxy` at a fixed endpoint, with a bucket of
    manifests (`ids`): a store the tests can stop (`stop`) and bring back, the same objects
    at the same endpoint (`start`). `close` kills every server it started."""

    def __init__(self, tmp_path, bucket: str, shards: int) -> None:
        self.front = free_port()
        self.recordings = [str(tmp_path / "recording.jsonl")]
        self.servers = [_moto(free_port(), self.recordings[0])]
        self.proxy: _Proxy | None = _Proxy(self.front, self._port())
        self.s3 = S3Server(f"http://127.0.0.1:{self.front}")
        try:
            self.bucket = self.s3.create_bucket(bucket)
            self.client = self.s3.client()
            self.ids = _manifests(
                lambda n, b: self.client.put_object(Bucket=self.bucket, Key=f"in/{n}", Body=b),
                shards=shards,
                per=3,
            )
        except BaseException:
            self.close()
            raise

    def _port(self) -> int:
        return int(self.servers[-1].args[-1])

    def config(self, **extra: object):
        return load_config(
            None,
            {
                **SLOW,
                "input": f"s3://{self.bucket}/in",
                "output": f"s3://{self.bucket}/out",
                "storage.endpoint_url": self.s3.endpoint_url,
                **extra,
            },
        )

    def stop(self) -> None:
        """Clients see resets, then connection refused; the server keeps its objects."""
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None

    def start(self) -> None:
        self.proxy = _Proxy(self.front, self._port())

    def restart_server(self) -> None:
        """Kill the server and start a new one that replays the recording (the same objects,
        as a restarted persistent store has); reachable once `start` is called."""
        self.servers[-1].kill()
        self.servers[-1].wait(10)
        rec = f"{self.recordings[0]}.{len(self.servers)}"
        shutil.copy(self.recordings[-1], rec)
        self.recordings.append(rec)
        self.servers.append(_moto(free_port(), rec))
        req = urllib.request.Request(
            f"http://127.0.0.1:{self._port()}/moto-api/recorder/replay-recording", method="POST"
        )
        urllib.request.urlopen(req, timeout=120)

    def close(self) -> None:
        self.stop()
        for p in self.servers:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.mark.slow
def test_object_store_restarted_mid_job(tmp_path, ray_session):
    # The store is a moto server that records every request; "restarting" it is a new server
    # that replays the recording — the same objects, as a restarted persistent store has —
    # before it becomes reachable again at the same endpoint (a forwarder in front of it).
    store = _FrontedStore(tmp_path, "restart", shards=6)
    try:
        bucket, client = store.bucket, store.client
        trace = tmp_path / "trace.txt"
        cfg = store.config(**{"debug.trace_path": str(trace)})

        def committed() -> dict[str, bytes]:
            try:
                listing = client.list_objects_v2(Bucket=bucket, Prefix="out/")
            except Exception:
                return {}
            keys = [
                o["Key"]
                for o in listing.get("Contents", [])
                if o["Key"].endswith(".parquet") and o["Key"].count("/") == 1
            ]
            return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}

        job = _Job(cfg)
        job.start()
        _wait(lambda: len(committed()) >= 1, 240, "a shard commits", job.is_alive)
        before = committed()
        mark = os.path.getsize(trace)
        # Stop the store: the forwarder goes away (connections reset, then refused) and the
        # server is killed; ~8 s later a new server with the same objects takes its place.
        stopped = time.time()
        store.stop()
        store.restart_server()
        time.sleep(max(0.0, stopped + 8.0 - time.time()))
        store.start()
        job.join(400)
        assert not job.is_alive(), "the job hung after the store came back"
        outcome = "completed"
        if job.error is not None:  # allowed: a clear failure, then a rerun completes
            outcome = f"failed: {job.error!r}"[:300]
            assert isinstance(job.error, StoreUnavailable), job.error
            assert "rerun the same command" in str(job.error)
            run_job(cfg)
        emb, err, _ = read_output(f"{bucket}/out", store.s3.filesystem())
        ids = emb.column("id").to_pylist()
        assert sorted(ids) == sorted(store.ids), f"({outcome}) an item missing or present twice"
        assert err.num_rows == 0, f"({outcome}) items recorded as failed: {err.to_pylist()}"
        after = committed()
        assert {k: after[k] for k in before} == before, "a committed file was rewritten"
        assert not (_ids_of(before) & set(_trace(str(trace), mark))), "committed work recomputed"
        print(f"object store restart: the job {outcome}")
    finally:
        store.close()


@pytest.mark.slow
def test_object_store_gone_for_good_ends_the_run_with_one_sentence(tmp_path, ray_session):
    # The store goes away mid-run and stays away past every retry: the run ends with the
    # store's error (the stage's own, not Ray Data's UDF wrapper), saying to rerun; the rerun
    # once the store is back completes, every item once.
    store = _FrontedStore(tmp_path, "gone", shards=4)
    try:
        # The lock the run could not remove with the store gone is this process's: the rerun
        # takes it over once its lease ends, as one from another would.
        cfg = store.config(lock_ttl_s=10)

        def parts() -> int:
            listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix="out/_parts/")
            return listing.get("KeyCount", 0)

        job = _Job(cfg)
        job.start()
        _wait(lambda: parts() >= 1, 240, "a part is written", job.is_alive)
        store.stop()
        job.join(400)
        assert not job.is_alive(), "the job hung with the store gone"
        assert isinstance(job.error, StoreUnavailable), repr(job.error)
        message = str(job.error)
        assert message.startswith(f"object store {store.s3.endpoint_url} is unavailable: "), message
        assert "rerun the same command to resume" in message
        assert "UDF" not in message and "Traceback" not in message, message
        store.start()
        run_job(cfg)
        emb, err, _ = read_output(f"{store.bucket}/out", store.s3.filesystem())
        assert sorted(emb.column("id").to_pylist()) == sorted(store.ids)
        assert err.num_rows == 0
    finally:
        store.close()


@pytest.mark.slow
def test_ctrl_c_while_the_store_hangs_ends_the_command_and_the_rerun_takes_over(tmp_path):
    # The output's store stops answering mid-run (connections accepted, nothing back) and the
    # user presses Ctrl-C: the cleanup (releasing the lock, reading what the output keeps)
    # hangs on that store. A second Ctrl-C ends the command at once with how to resume; once
    # the store answers again, the rerun takes the dead process's lock over and completes.
    store = _FrontedStore(tmp_path, "hang", shards=4)
    try:
        sets = {**SLOW, "storage.endpoint_url": store.s3.endpoint_url, "ray.num_cpus": 4}
        cmd = [
            sys.executable, "-m", "pipelines.embed", "--progress-interval", "1",
            "--input", f"s3://{store.bucket}/in", "--output", f"s3://{store.bucket}/out",
            *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")),
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": REPO,
            "RAY_AUTH_MODE": "disabled",
            "AWS_ACCESS_KEY_ID": store.s3.key,
            "AWS_SECRET_ACCESS_KEY": store.s3.secret,
            "AWS_DEFAULT_REGION": store.s3.region,
        }
        log = tmp_path / "run.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            running = lambda: proc.poll() is None  # noqa: E731
            _wait(lambda: "progress 00:0" in log.read_text(), 240, "the run to start", running)
            assert store.proxy is not None
            store.proxy.paused.set()
            time.sleep(2)
            proc.send_signal(signal.SIGINT)
            time.sleep(5)  # the cleanup is now waiting on the store
            assert proc.poll() is None, log.read_text()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 130, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        assert "imagebind-embed: interrupted again: exiting now" in text, text
        assert "resume with the same command:" in text and "Traceback" not in text, text
        store.proxy.paused.clear()
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout + again.stderr
        emb, err, _ = read_output(f"{store.bucket}/out", store.s3.filesystem())
        assert sorted(emb.column("id").to_pylist()) == sorted(store.ids)
        assert err.num_rows == 0
    finally:
        store.close()


# --------------------------------------------------------------------- node loss


@pytest.mark.slow
def test_worker_node_lost_mid_job(tmp_path):
    # A head and two worker nodes on this machine, in a subprocess (the test session has its
    # own Ray); one worker node is killed once a shard is committed.
    corpus, out, trace = tmp_path / "man", tmp_path / "out", tmp_path / "trace.txt"
    corpus.mkdir()
    all_ids = _manifests(lambda n, b: (corpus / n).write_bytes(b), shards=6, per=3)
    report = tmp_path / "report.json"
    overrides = {
        **SLOW,
        "input": str(corpus),
        "output": str(out),
        "debug.trace_path": str(trace),
    }
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([REPO, HERE, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "fault_node_loss.py"),
            json.dumps(overrides),
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rep = json.loads(report.read_text())
    assert rep["removed_node_had"], "the killed node ran none of the job's work"
    before = {n: bytes.fromhex(h) for n, h in rep["committed_before"].items()}
    assert 1 <= len(before) < 6, "the kill did not land mid-way"
    emb, err, _ = read_output(str(out))
    ids = emb.column("id").to_pylist()
    assert sorted(ids) == sorted(all_ids), "an item is missing or present twice"
    assert err.num_rows == 0, err.to_pylist()
    after = _local_committed(str(out))
    assert {n: after[n] for n in before} == before, "a committed file was rewritten"
    recomputed = _ids_of(before) & set(_trace(str(trace), rep["trace_mark"]))
    assert not recomputed, f"committed work recomputed: {sorted(recomputed)}"
