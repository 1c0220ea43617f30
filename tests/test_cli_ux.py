"""The CLIs as a newcomer meets them (issue 22): config errors in the user's terms, a dry run
that refuses what the run refuses, nothing created for a missing input, no lock files left
behind, progress lines on a timer, Ctrl-C that says how to resume, and a log without false
alarms."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from logcheck import alarming_lines

from pipelines import cli, embed
from pipelines.config import ConfigError, load_config
from pipelines.demo_corpus import write_demo_corpus
from pipelines.lineage import model_lineage
from pipelines.plan import plan_job
from pipelines.progress import ProgressReporter, format_progress
from pipelines.store import Output, OutputDamaged, PreconditionFailed, open_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")


def run_embed(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.embed_main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------- config errors


def test_set_typo_names_the_field_the_flag_and_a_fix(capsys, tmp_path):
    base = ["--config", DEMO, "--input", str(tmp_path), "--dry-run"]
    rc, _, err = run_embed(capsys, *base, "--set", "preprocess.batchsize=3")
    assert rc == 2
    assert "preprocess.batchsize: unknown field; did you mean 'batch_size'?" in err
    assert "[from --set preprocess.batchsize=3]" in err
    assert DEMO not in err  # the value did not come from the file

    rc, _, err = run_embed(capsys, *base, "--set", "encoder_defaults.max_actors=0")
    assert rc == 2
    assert "encoder_defaults.max_actors: must be a number > 0 or must be 'auto' (got 0)" in err
    assert "[from --set encoder_defaults.max_actors=0]" in err
    assert "constrained-int" not in err and "literal[" not in err

    rc, _, err = run_embed(capsys, *base, "--set", "preprocess.batch_sizes={text:2}")
    assert rc == 2
    assert "space after each colon" in err and "--set preprocess.batch_sizes.text=2" in err

    rc, _, err = run_embed(capsys, *base, "--set", "preprocess.batch_sizes=2")
    assert rc == 2
    assert "preprocess.batch_sizes: must be a section of fields" in err
    assert "e.g. --set preprocess.batch_sizes.text=2" in err


def test_file_typo_names_the_file(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("input: in\noutput: out\npreset: tiny\nencoder_defaults:\n  dtpye: float32\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad), {"preset": "tiny"}, {"preset": "--preset"})
    msg = str(e.value)
    assert f"encoder_defaults.dtpye: unknown field; did you mean 'dtype'? [from {bad}]" in msg
    unknown = r"preset: unknown preset .gigantic.; choose one of .* \[from --preset\]"
    with pytest.raises(ConfigError, match=unknown):
        load_config(str(bad), {"preset": "gigantic"}, {"preset": "--preset"})


def test_reindex_config_errors_name_the_source(capsys, tmp_path):
    rc = cli.reindex_main(["--input", str(tmp_path), "--index-root", str(tmp_path / "idx"),
                       "--set", "index.keep_versions=0"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "index.keep_versions: must be a number >= 1 (got 0) [from --set" in err
    rc = cli.reindex_main(["--input", str(tmp_path), "--index-root", str(tmp_path / "idx"),
                       "--set", "index.nprobes=4"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "index.nprobes: unknown field; did you mean 'nprobe'? [from --set" in err


# ----------------------------------------------------------------------------- validation


def test_missing_input_creates_nothing(capsys, tmp_path):
    missing = str(tmp_path / "no-such-corpus")
    root, out = tmp_path / "index", tmp_path / "embeddings"
    rc = cli.reindex_main(["--config", DEMO, "--input", missing, "--index-root", str(root)])
    assert rc == 2
    assert f"input not found: {missing}" in capsys.readouterr().err
    assert not root.exists()
    rc, _, err = run_embed(capsys, "--config", DEMO, "--input", missing, "--output", str(out))
    assert rc == 2 and f"input not found: {missing}" in err
    assert not out.exists()


def test_no_credentials_and_unknown_schemes_are_one_sentence(capsys, tmp_path, monkeypatch):
    # Before: botocore's NoCredentialsError and "unsupported URI scheme" ValueError tracebacks,
    # exit 1. Nothing is contacted: botocore finds no credentials before any request.
    corpus = str(tmp_path / "corpus")
    write_demo_corpus(corpus)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    base = ["--config", DEMO, "--input", corpus, "--s3-endpoint", "http://127.0.0.1:9"]
    for extra in ([], ["--dry-run"]):
        rc, _, err = run_embed(capsys, *base, "--output", "s3://bucket/x", *extra)
        assert rc == 2, err
        assert "output s3://bucket/x: no credentials for http://127.0.0.1:9" in err, err
        assert "Traceback" not in err
    # Unknown to fsspec (ftpx), and known to it but failing to open with no URI named: a
    # driver not installed (gs: ImportError), libjvm missing (hdfs), ftp's TypeError.
    for scheme in ("ftpx", "gs", "hdfs", "ftp"):
        for flag in ("--output", "--input"):
            argv = [*base, "--output", str(tmp_path / "o")]
            argv[argv.index(flag) + 1] = f"{scheme}://b/x"
            rc, _, err = run_embed(capsys, *argv, "--dry-run")
            what = flag.removeprefix("--")
            assert rc == 2 and f"{what} {scheme}://b/x: unsupported URI scheme '{scheme}'" in err
            assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_bad_checkpoint_is_one_sentence_before_ray_starts_or_the_output_is_written(
    capsys, tmp_path
):
    # Before: a missing file was a CheckpointError traceback (exit 1) after the output folder
    # was made, and --dry-run passed; a text file or another model's weights failed in the
    # encoder actors ~20 s into the run (a Ray traceback), after `_job.json` recorded that
    # checkpoint's lineage, so the rerun with the right one was refused as another model's.
    import torch

    import imagebind_core as ibc

    corpus = str(tmp_path / "corpus")
    write_demo_corpus(corpus)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"head.weight": torch.zeros(2, 2)}, other)
    cases = [
        (str(tmp_path / "missing.pth"), f"checkpoint not found: {tmp_path / 'missing.pth'}"),
        (str(tmp_path), f"{tmp_path}: is a folder, not a checkpoint file"),
        (str(text), f"{text}: not a PyTorch checkpoint (it starts with b'not "),
        (str(other), "checkpoint does not match the 'tiny' configuration"),
    ]
    for checkpoint, said in cases:
        out = tmp_path / "out"
        extra = [[]] if checkpoint == str(other) else [[], ["--dry-run"]]
        for flags in extra:
            argv = ["--config", DEMO, "--input", corpus, "--output", str(out)]
            rc, _, err = run_embed(capsys, *argv, "--checkpoint", checkpoint, *flags)
            assert rc == 2 and said in err, err
            assert "Traceback" not in err
            assert not out.exists(), "the output was written for a run that cannot start"
    # A checkpoint of the preset passes the same check (no false alarm).
    good = tmp_path / "tiny.pth"
    torch.save(ibc.build_model(ibc.get_config("tiny"), seed=0).state_dict(), good)
    assert ibc.verify_checkpoint(str(good), "tiny", ["vision", "text", "audio"])


def _started_output(tmp_path) -> tuple[str, str]:
    """A demo corpus and an output started by the demo config (its job record written)."""
    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "emb")
    write_demo_corpus(corpus)
    cfg = load_config(DEMO, {"input": corpus, "output": out})
    plan = plan_job(cfg)
    output = Output(out)
    output.makedirs(output.root)
    embed._check_record(output, cfg, plan, model_lineage(cfg, plan.kinds))
    return corpus, out


def test_dry_run_refuses_what_the_run_refuses(capsys, tmp_path):
    corpus, out = _started_output(tmp_path)
    argv = ["--config", DEMO, "--input", corpus, "--output", out]
    rc, plan, _ = run_embed(capsys, *argv, "--dry-run")
    assert rc == 0 and "shards:  3 (0 already committed, 3 to do)" in plan
    rc_dry, _, err_dry = run_embed(capsys, *argv, "--preset", "base", "--dry-run")
    rc_run, _, err_run = run_embed(capsys, *argv, "--preset", "base")
    assert rc_dry == rc_run == 3
    assert "was started by a different job" in err_dry
    assert err_dry.strip().splitlines()[-1] == err_run.strip().splitlines()[-1]


def test_a_damaged_job_record_is_named_not_a_traceback(capsys, tmp_path):
    corpus, out = _started_output(tmp_path)
    argv = ["--config", DEMO, "--input", corpus, "--output", out]
    record = os.path.join(out, "_job.json")
    for junk in (b"", b"}{", b"[]", b"{}"):
        with open(record, "wb") as f:
            f.write(junk)
        for extra in (["--dry-run"], []):
            rc, _, err = run_embed(capsys, *argv, *extra)
            assert rc == 3, err
            assert f"{record} is not a job record" in err and "Traceback" not in err, err
            assert f"delete {out} to start over" in err


def test_damaged_parts_inputs_and_committed_files(tmp_path, caplog):
    """A part file that is not readable is work in progress: deleted, its items redone. An
    unreadable `_inputs` entry is a cache: ignored. An unreadable committed file is named."""
    import pyarrow as pa

    output = Output(str(tmp_path / "o"))
    output.makedirs(output.parts_dir("s"))
    output.write_table_atomic(f"{output.parts_dir('s')}/a.parquet", pa.table({"id": ["x", "y"]}))
    bad = f"{output.parts_dir('s')}/b.parquet"
    with open(bad, "wb") as f:
        f.write(b"PAR1 cut short")
    with open(_mkparent(output.inputs_path("s")), "wb") as f:
        f.write(b"")  # emptied
    with caplog.at_level("WARNING", logger="pipelines.store"):
        assert output.part_ids("s") == {"x", "y"}
        assert output.read_identity("s") is None
    assert not os.path.exists(bad)
    assert f"part file {bad} is not readable" in caplog.text
    assert f"{output.inputs_path('s')} is not readable" in caplog.text
    output.write_table_atomic(output.shard_path("s"), pa.table({"id": ["x"]}))
    assert output.committed_ids("s") == {"x"}
    with open(output.shard_path("s"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(OutputDamaged, match=r"committed file .*/s\.parquet is not readable"):
        output.committed_ids("s")


def _mkparent(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


# ----------------------------------------------------------------------------- the store


def test_local_store_serialises_updates_and_leaves_no_lock_file(tmp_path):
    store = open_store(str(tmp_path))
    store.put("n", b"0")

    def bump(times: int) -> None:
        for _ in range(times):
            while True:
                data, etag = store.get("n")
                try:
                    store.put("n", str(int(data) + 1).encode(), if_match=etag)
                    break
                except PreconditionFailed:
                    continue

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("n")[0] == b"100"
    store.delete("n")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- logs


def test_stderr_filter_drops_rays_false_alarm_and_keeps_the_rest():
    ray_line = (
        "[2026-12-04 17:16:30,497 E 27357 27357] core_worker.cc:2465: Actor with class name: "
        "'MapWorker(MapBatches(EncodeBatch))' and ID: '8e7c' has constructor arguments in the "
        "object store and max_restarts > 0. If the arguments in the object store go out of scope"
    )
    code = (
        "import os, sys\n"
        "from pipelines.console import filtered_stderr\n"
        "with filtered_stderr():\n"
        f"    os.write(2, {ray_line!r}.encode() + b'\\n')\n"
        "    os.write(2, b'[x E 1 1] core_worker.cc:1: something else\\n')\n"
        "    print('from python', file=sys.stderr)\n"
        "print('after', file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [
        "[x E 1 1] core_worker.cc:1: something else",
        "from python",
        "after",
    ]


def test_rays_few_inputs_warning_is_dropped_and_other_warnings_kept():
    # Ray Data warns when an operator gets fewer inputs than its concurrency (a job of one
    # manifest); the CLIs drop exactly that warning, from Ray Data only.
    few = (
        "The maximum number of concurrent tasks for 'MapBatches(read_tasks)' is set to 2, but "
        "the operator only received 1 input(s). This means that the operator can launch at "
        "most 1 task(s), which is less than the concurrency limit."
    )
    actors = few.replace("maximum", "minimum").replace("concurrent tasks", "concurrent actors")
    ops = "ray.data._internal.execution.operators"
    code = (
        "import warnings\n"
        "from pipelines.console import configure_logging\n"
        "configure_logging('INFO')\n"
        "def warn(msg, module, line):\n"
        "    warnings.warn_explicit(msg, UserWarning, 'w.py', line, module=module)\n"
        f"warn({few!r}, '{ops}.task_pool_map_operator', 1)\n"
        f"warn({actors!r}, '{ops}.actor_pool_map_operator', 2)\n"
        f"warn({few!r}, 'someone.else', 3)\n"
        f"warn('another warning', '{ops}.task_pool_map_operator', 4)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    shown = [line for line in res.stderr.splitlines() if "UserWarning" in line]
    assert [line.split(":")[1] for line in shown] == ["3", "4"], res.stderr
    assert alarming_lines(res.stderr), "the log check sees Python warnings"


def test_rays_gpu_actor_cpu_warning_is_dropped_and_other_records_kept():
    # A GPU encoder pool asks for num_cpus and num_gpus; Ray Data logs that this is
    # "experimental" once per pool. The CLIs drop that record, from that logger only.
    both = (
        "Specifying both num_cpus and num_gpus for map tasks is experimental, and may result "
        "in scheduling or stability issues. Please report any issues to the Ray team: "
        "https://github.com/ray-project/ray/issues/new/choose"
    )
    code = (
        "import logging\n"
        "from pipelines.console import configure_logging\n"
        "configure_logging('INFO')\n"
        "ops = logging.getLogger('ray.data._internal.execution.operators.map_operator')\n"
        f"ops.warning({both!r})\n"
        "ops.warning('kept: from the same logger')\n"
        f"logging.getLogger('someone.else').warning({both!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    shown = [line.split(": ", 1)[1] for line in res.stderr.splitlines() if "WARNING" in line]
    assert shown == ["kept: from the same logger", both], res.stderr


# ----------------------------------------------------------------------------- progress


def test_progress_line_has_rate_and_eta_when_the_total_is_known():
    counts = {"read": 40, "preprocess": 30, "encode": 20}
    line = format_progress(counts, 10.0, 100, 1, 4, 16)
    assert line == (
        "progress 00:10: read 40, preprocessed 30, embedded 20/100 (20%, 2 items/s, "
        "ETA 00:40), committed 1/4 shards (16 items)"
    )
    assert "ETA" not in format_progress(counts, 10.0, None, 0, 4, 0)


def test_a_run_that_stops_moving_is_warned_about_and_again_while_it_stays_stuck(caplog):
    reporter = ProgressReporter(None, 10.0, 100, lambda: (0, 4, 0), stall_warning_s=300)
    busy, stuck = ({"read": 1}, 0, 0), ({"read": 2}, 0, 0)
    with caplog.at_level("WARNING", logger="pipelines.progress"):
        assert reporter.watch(busy, 0.0) is None
        assert reporter.watch(stuck, 10.0) is None  # it moved
        assert reporter.watch(stuck, 309.0) is None  # still for 299 s
        first = reporter.watch(stuck, 310.0)
        assert first and first.startswith("no progress for 05:00: ") and "Ctrl-C" in first
        assert reporter.watch(stuck, 400.0) is None  # warned once per period, not per line
        assert reporter.watch(stuck, 610.0).startswith("no progress for 10:00: ")
        assert reporter.watch(busy, 620.0) is None  # it moves again: the clock restarts
        assert reporter.watch(busy, 900.0) is None
        assert reporter.watch(busy, 920.0).startswith("no progress for 05:00: ")
    assert [r.levelname for r in caplog.records] == ["WARNING"] * 3


# ----------------------------------------------------------------------------- a real job


def _job(corpus: str, out: str) -> list[str]:
    return [
        sys.executable, "-m", "pipelines.embed", "--config", DEMO,
        "--input", corpus, "--output", out, "--progress-interval", "1",
        "--set", "files.files_per_shard=1000",
        "--set", "preprocess.batch_size=4",
        "--set", "debug.delay_per_item_s=0.4",
        "--set", "ray.num_cpus=4",
    ]  # fmt: skip


@pytest.mark.slow
def test_progress_ctrl_c_resume_and_a_quiet_log(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "emb"
    for i in range(40):
        (corpus / "txt").mkdir(parents=True, exist_ok=True)
        (corpus / "txt" / f"cap{i:02d}.txt").write_text(f"caption number {i}")
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_AUTH_MODE": "disabled"}
    cmd = _job(str(corpus), str(out))
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    # Progress lines come on the timer, before any shard is committed; interrupt once the
    # first parts are written.
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        text = log.read_text()
        parts = list((out / "_parts").rglob("*.parquet")) if (out / "_parts").exists() else []
        if parts and re.search(r"progress \d\d:\d\d: read \d+", text):
            break
        time.sleep(0.5)
    assert proc.poll() is None, log.read_text()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130, log.read_text()
    first = log.read_text()
    assert "Traceback" not in first
    assert "imagebind-embed: interrupted." in first
    assert "resume with the same command:" in first
    assert "--set debug.delay_per_item_s=0.4" in first.split("resume with the same command:")[1]
    kept = re.search(r"(\d+) embedded items in the parts of 1 unfinished shards", first)
    assert kept and int(kept.group(1)) > 0, first
    assert not (out / "_lock").exists()

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text
    reused = re.search(r"reused (\d+) items from earlier parts", again.stdout)  # the summary
    assert reused and int(reused.group(1)) >= int(kept.group(1)), text
    embedded = re.search(r"text\s+(\d+) embedded", again.stdout)
    assert embedded and int(embedded.group(1)) + int(reused.group(1)) == 40, text
    assert alarming_lines(text) == [], text
    assert sorted(os.listdir(out)) == ["_inputs", "_job.json", "files-00000-of-00001.parquet"]


# A command line whose cleanup after Ctrl-C hangs (its store stopped answering): the run
# stops, then the cleanup blocks forever.
_HANGING_CLEANUP = """
import os, threading, time
from pipelines.console import bounded_interrupts
with bounded_interrupts("imagebind-embed", None, grace_s=float(os.environ["GRACE"])):
    try:
        print("running", flush=True)
        time.sleep(600)
    except KeyboardInterrupt:
        print("cleaning up", flush=True)
        threading.Event().wait()
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_ends_a_command_line_whose_cleanup_hangs(presses):
    """One Ctrl-C: the cleanup gets its grace, then the process exits 130 saying how to
    resume; a second Ctrl-C exits at once."""
    grace = 2.0 if presses == 1 else 300.0
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANGING_CLEANUP, "--some-flag"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "GRACE": str(grace)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "running\n"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "cleaning up\n"
    started = time.monotonic()
    if presses == 2:
        proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    took = time.monotonic() - started
    err = proc.stderr.read()
    why = "the cleanup did not finish within 2 s" if presses == 1 else "interrupted again"
    assert f"imagebind-embed: {why}: exiting now" in err, err
    assert "resume with the same command:\n    imagebind-embed --some-flag" in err, err
    assert took < 30, took  # with two presses, long before the 300 s grace


def test_reindex_summary_names_the_parent_only_when_there_is_one():
    from pipelines.reindex import ReindexResult

    out = ReindexResult("unchanged", "/idx", 6, "v6").format()
    assert "version v6 stays the published one" in out and "parent" not in out
    out = ReindexResult("published", "/idx", 1, "v1").format()
    assert "version v1 (the first version)" in out
    assert "version v7 (parent v6)" in ReindexResult("published", "/i", 7, "v7", "v6").format()
