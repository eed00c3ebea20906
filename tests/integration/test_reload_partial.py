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


def test_a_reload_with_a_new_ring_keeps_one_answer_per_frame_and_every_lot_closed(tmp_path: Path):
    source = {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 100000, "fps": 40.0}
    cfg = config(tmp_path, source, engine={"kind": "zeroshot", "threads": 1, "input_size": 64},
                 lots={"part_count": 5}, ring={"slots": 16})
    new_file = tmp_path / "new.toml"
    new_file.write_text(
        f'[source]\nkind = "synthetic"\nwidth = 64\nheight = 64\nn_frames = 100000\nfps = 40.0\n'
        f'[ring]\nslots = 24\n[lots]\npart_count = 5\n'
        f'[publish]\nendpoint = "{cfg.publish.endpoint}"\ncontrol_endpoint = "{cfg.publish.control_endpoint}"\n'
        f'heartbeat_s = 0.5\n'
        f'[store]\nurl = "{cfg.store.url}"\nspool_dir = "{cfg.store.spool_dir}"\nflush_interval_s = 0.1\n'
        f'[metrics]\nport = 0\n'
        f'[engine]\nkind = "zeroshot"\nthreads = 1\ninput_size = 64\n')

    def reload_ring(daemon):
        import time

        time.sleep(0.5)  # lots are under way
        daemon.config_path = new_file
        before = daemon.status_brief()["frames_in"]
        reply = daemon._handlers()["reload"]([])
        # the new ring continues the old one's counters: status never counts backwards
        return reply, len(daemon.ring.meta), before, daemon.status_brief()["frames_in"]

    run = run_daemon(cfg, stop_after_s=2.0, timeout_s=180, exit_at_source_end=False, while_running=reload_ring)
    assert run.error is None and run.rc == 0
    reply, slots, frames_before, frames_after = run.observed
    assert "source" in reply["restarted"] and slots == 24
    assert frames_after >= frames_before > 0
    # the new source numbers its frames afresh: a frame is its id and capture time
    rows = run.db_frames()
    keys = [(r["frame_id"], round(r["t_capture"], 6)) for r in rows]
    assert keys and len(set(keys)) == len(keys)  # every captured frame answered once, across the swap
    assert len(rows) == len(run.frames())
    opened = [h["lot_id"] for h in run.lots("opened")]
    closed = [h["lot_id"] for h in run.lots("closed")]
    assert sorted(opened) == sorted(closed) and len(set(closed)) == len(closed)  # each lot closed once
    # every lot's summary counts the frames published for it at tier 1
    by_lot = {}
    for h in run.frames():
        by_lot[h["lot_id"]] = by_lot.get(h["lot_id"], 0) + 1
    for h in run.lots("closed"):
        assert sum(v for k, v in h["summary"].items() if k != "tier2") == by_lot.get(h["lot_id"], 0), h
    # the lot open at the restart closed with it: no lot holds frames of both numberings
    assert [h["reason"] for h in run.lots("closed")].count("source_restart") == 1
    ids_by_lot = {}
    for h in run.frames():
        ids_by_lot.setdefault(h["lot_id"], []).append(h["frame_id"])
    assert all(len(set(ids)) == len(ids) for ids in ids_by_lot.values()), ids_by_lot


def test_a_reload_whose_warm_up_fails_on_the_new_frame_size_keeps_reading_the_new_camera(tmp_path: Path):
    """Regression: once the new source was open, a failure after it (an engine warm-up that runs
    out of GPU memory on the new frame size) skipped the restart of acquisition: the camera stayed
    open and unread, the line idle, and the reply said "nothing changed"."""
    import time

    source = {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 100000, "fps": 20.0}
    cfg = config(tmp_path, source, engine={"kind": "zeroshot", "threads": 1, "input_size": 64})
    new_file = tmp_path / "new.toml"
    new_file.write_text(
        f'[source]\nkind = "synthetic"\nwidth = 96\nheight = 96\nn_frames = 100000\nfps = 20.0\n'
        f'[publish]\nendpoint = "{cfg.publish.endpoint}"\ncontrol_endpoint = "{cfg.publish.control_endpoint}"\n'
        f'heartbeat_s = 0.5\n'
        f'[store]\nurl = "{cfg.store.url}"\nspool_dir = "{cfg.store.spool_dir}"\nflush_interval_s = 0.1\n'
        f'[metrics]\nport = 0\n'
        f'[engine]\nkind = "zeroshot"\nthreads = 1\ninput_size = 64\n')

    def reload_failing_warm_up(daemon):
        def out_of_memory(*args):
            raise RuntimeError("CUDA out of memory")

        daemon.config_path = new_file
        daemon.inspector.engine.warmup = out_of_memory
        with pytest.raises(ValueError, match="reload failed part-way") as err:
            daemon._handlers()["reload"]([])
        before = daemon.ring.frames_in
        time.sleep(1.0)
        return str(err.value), before, daemon.ring.frames_in, daemon.ring.shape

    run = run_daemon(cfg, stop_after_s=1.0, timeout_s=180, exit_at_source_end=False,
                     while_running=reload_failing_warm_up)
    assert run.error is None and run.rc == 0
    message, before, after, shape = run.observed
    assert "already restarted on the new config: source" in message and "CUDA out of memory" in message
    assert shape[:2] == (96, 96) and after > before  # the new camera's frames keep coming in


def test_a_ctl_reload_queued_behind_a_stop_is_answered_at_once(tmp_path: Path):
    """Regression: a `ctl reload` that arrived as the daemon was stopping waited its full 60 s for
    a reload nothing would run, holding the control socket (and the stop) that long."""
    import threading
    import time

    source = {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 100000, "fps": 20.0}
    cfg = config(tmp_path, source, engine={"kind": "zeroshot", "threads": 1, "input_size": 64})

    def stop_then_reload(daemon):
        out: dict = {}

        def ctl_reload() -> None:
            t0 = time.monotonic()
            try:
                daemon._handlers()["reload"]([])
            except RuntimeError as exc:
                out["error"] = str(exc)
            out["waited_s"] = time.monotonic() - t0

        daemon.config_path = tmp_path / "unused.toml"
        daemon._wake("stop")  # the stop is queued first: the main loop leaves before any reload
        t = threading.Thread(target=ctl_reload)
        t.start()
        t.join(90)
        return out

    run = run_daemon(cfg, timeout_s=180, exit_at_source_end=False, while_running=stop_then_reload)
    assert run.error is None and run.rc == 0
    assert "stopping; the reload was not run" in run.observed["error"]
    assert run.observed["waited_s"] < 30  # not the 60 s of a reload that never comes


def test_a_reload_moves_the_publisher_to_its_new_endpoint(tmp_path: Path):
    """[publish] endpoint is applied by a reload (it needed a daemon restart): subscribers of the
    new endpoint get the frames, the seq numbering goes on, the config says where it publishes."""
    import json
    import time

    import zmq

    source = {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 100000, "fps": 20.0}
    cfg = config(tmp_path, source, engine={"kind": "zeroshot", "threads": 1, "input_size": 64})
    new_file = tmp_path / "new.toml"
    moved = f"ipc://{tmp_path}/pub2"
    new_file.write_text(
        f'[source]\nkind = "synthetic"\nwidth = 64\nheight = 64\nn_frames = 100000\nfps = 20.0\n'
        f'[publish]\nendpoint = "{moved}"\ncontrol_endpoint = "{cfg.publish.control_endpoint}"\n'
        f'heartbeat_s = 0.5\n'
        f'[store]\nurl = "{cfg.store.url}"\nspool_dir = "{cfg.store.spool_dir}"\nflush_interval_s = 0.1\n'
        f'[metrics]\nport = 0\n[daemon]\nstage_stale_s = 120.0\n'
        f'[engine]\nkind = "zeroshot"\nthreads = 1\ninput_size = 64\n')

    def move(daemon):
        time.sleep(0.5)
        daemon.config_path = new_file
        reply = daemon._handlers()["reload"]([])
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.connect(moved)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        got, deadline = [], time.monotonic() + 10
        while time.monotonic() < deadline and not any(h["kind"] == "frame" for h in got):
            if sub.poll(100):
                got.append(json.loads(sub.recv_multipart()[1]))
        sub.close(linger=0)
        return reply, got, daemon.cfg.publish.endpoint, daemon.publisher.endpoint

    run = run_daemon(cfg, stop_after_s=1.0, timeout_s=180, exit_at_source_end=False, while_running=move)
    assert run.error is None and run.rc == 0
    reply, got, cfg_endpoint, bound = run.observed
    assert reply["restarted"] == ["publisher"] and "publish.endpoint" not in reply["needs_daemon_restart"]
    assert cfg_endpoint == moved == bound
    frames = [h for h in got if h["kind"] == "frame"]
    assert frames and frames[0]["seq"] > max(run.seqs())  # numbering went on from the old socket's
