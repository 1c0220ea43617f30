"""Start-up: the model loads while the first blocks are read and preprocessed.

Ray Data 2.60 starts an actor pool's actors without waiting for them
(`DataContext.wait_for_min_actors_s` is -1) and `EncodeBatch.__init__` only starts the load in
a thread. Proven by ordering, not timing: every encoder's load is held back
(`debug.load_gate_path`) until preprocessing has written its first items to the same file
(`debug.trace_path`), so the job can only finish if reading and preprocessing run while the
model waits to load; the file then shows items preprocessed before each "load <kind>" line."""

from __future__ import annotations

import media
from helpers.pipeline import SMALL_JOB, read_output

from pipelines.config import load_config
from pipelines.embed import run_job


def test_reads_and_preprocessing_run_while_the_model_loads(tmp_path, ray_session):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    names = []
    for i in range(6):
        (corpus / f"pic{i}.png").write_bytes(media.make_image("PNG", size=(64, 48), seed=i))
        (corpus / f"cap{i}.txt").write_text(f"caption number {i}")
        names += [f"pic{i}.png", f"cap{i}.txt"]
    events = tmp_path / "events.txt"
    cfg = load_config(
        None,
        {
            **SMALL_JOB,
            "input": str(corpus),
            "output": str(tmp_path / "out"),
            "debug.trace_path": str(events),
            "debug.load_gate_path": str(events),
        },
    )
    summary = run_job(cfg)

    emb, err, _ = read_output(str(tmp_path / "out"))
    assert sorted(emb.column("id").to_pylist()) == sorted(names) and err.num_rows == 0
    lines = events.read_text().splitlines()
    loads = [i for i, line in enumerate(lines) if line.startswith("load ")]
    assert sorted(lines[i] for i in loads) == ["load text", "load vision"], lines
    # Each load completed after preprocessing had finished work (an item line before it).
    assert min(loads) > 0 and not lines[0].startswith("load "), lines
    # The summary's start-up figures: Ray up, then the first encoded batch, then the end.
    assert 0 < summary.ray_up_seconds < summary.first_batch_seconds <= summary.seconds
