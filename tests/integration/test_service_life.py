"""`linewatch run` as systemd runs it: READY and watchdog pings on $NOTIFY_SOCKET, control socket
commands, SIGHUP reload (a bad file changes nothing), SIGTERM drains and exits 0 with every
frame answered in the database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from linewatch.control import request
from linewatch.store import query

pytestmark = pytest.mark.integration


def toml(tmp_path: Path, k_mad: float = 4.0, extra: str = "") -> str:
    return (f'[source]\nkind = "synthetic"\nwidth = 96\nheight = 96\nfps = 15.0\n'
            f'[lots]\npolicy = "control"\n'
            f'[threshold]\nk_mad = {k_mad}\n'
            f'[publish]\nendpoint = "ipc://{tmp_path}/pub"\ncontrol_endpoint = "ipc://{tmp_path}/ctl"\n'
            f'[store]\nurl = "sqlite:///{tmp_path}/lw.db"\nspool_dir = "{tmp_path}/spool"\n'
            f'[metrics]\nport = 0\n' + extra)


def notifications(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out += sock.recv(4096).decode().splitlines()
        except BlockingIOError:
            return out


def wait_for(pred, timeout_s: float, what: str):
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_ready_watchdog_control_reload_and_sigterm_drain(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml(tmp_path))
    notify_path = str(tmp_path / "notify")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    ns.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([sys.executable, "-m", "linewatch", "run", "--config", str(cfg)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env["WATCHDOG_PID"] = str(proc.pid)
    seen: list[str] = []
    done = threading.Event()

    def collect() -> None:  # as systemd does: the notify socket is read as datagrams arrive
        while not done.wait(0.05):
            seen.extend(notifications(ns))

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    try:
        wait_for(lambda: "READY=1" in seen, 120, "READY=1")
        ctl = f"ipc://{tmp_path}/ctl"
        assert request(ctl, "ping")["ok"]
        # lots by PLC message
        assert request(ctl, "lot start L-1 bracket")["lot_id"] == "L-1"
        time.sleep(1.5)
        assert request(ctl, "lot end")["closed"] == "L-1"
        # a live reload applies; a broken file is refused and changes nothing
        cfg.write_text(toml(tmp_path, k_mad=6.5))
        reply = request(ctl, "reload", timeout_s=60)
        assert reply["ok"] and reply["applied"] == ["threshold.k_mad"]
        cfg.write_text(toml(tmp_path, k_mad=7.0, extra="[ring]\nslots = 'lots'\n"))
        proc.send_signal(signal.SIGHUP)
        status = wait_for(lambda: (s := request(ctl, "status"))["reloads"]["failed"] == 1 and s,
                          30, "the refused reload")
        assert "ring.slots" in status["last_reload_error"]
        assert status["reloads"]["ok"] == 1
        reply = request(ctl, "reload", timeout_s=60)
        assert not reply["ok"] and "nothing changed" in reply["error"]
        wait_for(lambda: "WATCHDOG=1" in seen, 10, "a watchdog ping")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        done.set()
        collector.join()
        ns.close()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    assert "RELOADING=1" in seen
    # every frame id produced got exactly one tier-1 row, none lost at the SIGTERM
    rows = [r for r in query.fetch_results(f"sqlite:///{tmp_path}/lw.db") if r["tier"] == 1]
    ids = Counter(r["frame_id"] for r in rows)
    assert ids and max(ids.values()) == 1 and sorted(ids) == list(range(len(ids)))
    lots = {row["lot_id"]: row for row in query.fetch_lots(f"sqlite:///{tmp_path}/lw.db")}
    assert lots["L-1"]["recipe"] == "bracket" and lots["L-1"]["close_reason"] == "control_end"
    assert lots["L-1"]["n_frames"] > 0


def test_ready_is_sent_before_the_first_frame_of_a_silent_triggered_line(tmp_path, monkeypatch):
    """Regression: READY went to systemd only after the first frame. A hardware-triggered line
    with no part moving (an install after the shift) failed its start after TimeoutStartSec, and
    systemd restarted it for ever. READY now follows the start (source open, engine warm)."""
    import threading

    from daemon_harness import config

    from linewatch import daemon as daemon_mod

    real_create = daemon_mod.create_source

    def silent_camera(cfg):
        src = real_create(cfg)  # a real source, opened for real, whose trigger never comes

        def frames(stop):
            stop.wait()
            return iter(())

        src.frames = frames
        return src

    monkeypatch.setattr(daemon_mod, "create_source", silent_camera)
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(tmp_path / "notify"))
    ns.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    cfg = config(tmp_path, {"kind": "synthetic", "width": 64, "height": 64},
                 engine={"kind": "zeroshot", "threads": 1, "input_size": 64})
    d = daemon_mod.Daemon(cfg, None, install_signals=False)
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(d.run()), daemon=True)
    t.start()
    try:
        seen: list[str] = []
        wait_for(lambda: (seen.extend(notifications(ns)) or "READY=1" in seen), 120, "READY=1")
        assert not d.ready.is_set(), "no frame came: READY must not wait for one"
        assert any("waiting for the first frame" in line for line in seen), seen
    finally:
        d._wake("stop")
        t.join(60)
        ns.close()
    assert rc == [0]
