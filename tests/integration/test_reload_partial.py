"""A reload that fails after it restarted the source says so, and the config matches what runs
(a real daemon: ipc sockets, SQLite, the synthetic source)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon_harness import config, run_daemon


def test_a_reload_failing_after_the_source_restart_reports_it_and_keeps_the_running_source(tmp_path: Path):
    source = {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 100000, "fps": 20.0}
    cfg = config(tmp_path, source, engine={"kind": "zeroshot", "threads": 1, "input_size": 64})
    new_file = tmp_path / "new.toml"
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    # the source changes (a new frame rate) and the engine cannot start (its checkpoint is garbage)
    new_file.write_text(
        f'[source]\nkind = "synthetic"\nwidth = 64\nheight = 64\nn_frames = 100000\nfps = 25.0\n'
        f'[publish]\nendpoint = "{cfg.publish.endpoint}"\ncontrol_endpoint = "{cfg.publish.control_endpoint}"\n'
        f'heartbeat_s = 0.5\n'
        f'[store]\nurl = "{cfg.store.url}"\nspool_dir = "{cfg.store.spool_dir}"\nflush_interval_s = 0.1\n'
        f'[metrics]\nport = 0\n'
        f'[engine]\nkind = "dqformer"\ncheckpoint = "{tmp_path}/broken.pt"\n')

    def reload_part_way(daemon):
        daemon.config_path = new_file
        with pytest.raises(ValueError, match="reload failed part-way") as err:
            daemon._handlers()["reload"]([])
        return str(err.value), daemon.cfg.source.fps, daemon.cfg.engine.kind, daemon.status()["last_reload_error"]

    run = run_daemon(cfg, stop_after_s=1.0, timeout_s=180, exit_at_source_end=False, while_running=reload_part_way)
    assert run.error is None and run.rc == 0
    message, fps, engine_kind, last_error = run.observed
    assert "engine (dqformer)" in message and "already restarted on the new config: source" in message
    assert fps == 25.0  # the config names the source that runs now
    assert engine_kind == "zeroshot"  # the engine that runs is the previous one
    assert "already restarted" in last_error
