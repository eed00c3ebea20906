"""A shutdown step that fails does not stop the later ones (a real daemon: ipc sockets, SQLite)."""

from __future__ import annotations

from pathlib import Path

from daemon_harness import answers_per_frame, config, run_daemon


def test_a_failing_shutdown_step_still_flushes_the_store_and_exits_1(tmp_path: Path):
    source = {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 100000, "fps": 30.0}
    cfg = config(tmp_path, source, engine={"kind": "zeroshot", "threads": 1, "input_size": 64})

    def break_the_closer_stop(daemon):
        real_stop = daemon.closer.stop

        def boom(timeout_s):
            real_stop(timeout_s)  # it does stop, then reports a failure
            raise RuntimeError("tier 2 stop failed")

        daemon.closer.stop = boom

    run = run_daemon(cfg, stop_after_s=1.5, timeout_s=180, exit_at_source_end=False,
                     while_running=break_the_closer_stop)
    assert run.error is None and run.rc == 1  # a failed step is not a clean stop
    published = {h["frame_id"] for h in run.frames()}
    stored = answers_per_frame(run.db_frames())
    assert published and set(stored) == published  # the store still flushed every verdict
    assert set(stored.values()) == {1}
