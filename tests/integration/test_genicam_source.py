"""GenicamCamera against the real simulated GenTL producer shipped in the genicam wheel."""

from __future__ import annotations

import itertools
import signal
import threading

import numpy as np
import pytest

from linewatch.acquire.base import SourceError
from linewatch.acquire.genicam import GenicamCamera, find_simulated_cti
from linewatch.config import GenicamSource

pytestmark = pytest.mark.integration

CTI = find_simulated_cti()
if CTI is None:
    pytest.skip("no simulated GenTL producer (.cti) in the installed genicam wheel",
                allow_module_level=True)

# 100 fps keeps every test well under a second of acquisition.
FAST = {"Width": 320, "Height": 240, "PixelFormat": "Mono8", "AcquisitionFrameRate": 100.0}


def make_cfg(**overrides) -> GenicamSource:
    values = {"cti": CTI, "nodes": dict(FAST), "reopen_backoff_s": (0.05, 0.5),
              "fetch_timeout_s": 1.0}
    values.update(overrides)
    return GenicamSource(**values)


@pytest.fixture
def opened():
    """Open cameras for a test and close every one of them afterwards."""
    cams: list[GenicamCamera] = []

    def _open(**overrides) -> GenicamCamera:
        cam = GenicamCamera(make_cfg(**overrides))
        cams.append(cam)
        cam.open()
        return cam

    yield _open
    for cam in cams:
        cam.close()


def take(cam: GenicamCamera, n: int, stop: threading.Event | None = None):
    stop = stop or threading.Event()
    return list(itertools.islice(cam.frames(stop), n))


def test_frames_have_the_configured_shape_and_increasing_ids(opened):
    cam = opened()
    assert (cam.height, cam.width, cam.channels) == (240, 320, 3)
    assert cam.pixel_format == "Mono8"
    frames = take(cam, 10)
    ids = [f.meta.frame_id for f in frames]
    assert all(b > a for a, b in zip(ids, ids[1:])), ids
    for f in frames:
        assert f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8
        assert (f.meta.height, f.meta.width, f.meta.camera) == (240, 320, "cam0")
        assert np.array_equal(f.image[..., 0], f.image[..., 2])  # mono replicated
        assert f.image.flags.owndata  # pixels copied out of the GenTL buffer
    assert cam.status.connected


def test_the_frame_loop_shows_it_is_alive(opened):
    """What the watchdog reads: a triggered line may send no frame for hours while its loop runs."""
    import time

    cam = opened()
    t0 = time.monotonic()
    take(cam, 2)
    assert cam.status.t_alive >= t0


def test_width_height_nodes_change_the_frame_size(opened):
    cam = opened(nodes={"Width": 200, "Height": 150})
    assert (cam.width, cam.height) == (200, 150)
    assert take(cam, 2)[0].image.shape == (150, 200, 3)


def test_rgba8_becomes_rgb_or_mono(opened):
    cam = opened(nodes={**FAST, "PixelFormat": "RGBa8"})
    img = take(cam, 1)[0].image
    assert img.shape == (240, 320, 3)
    assert img.std() > 0  # the bouncing ball is drawn on white: not a blank frame
    cam.close()
    mono = opened(nodes={**FAST, "PixelFormat": "RGBa8"}, serial="1", channels=1)
    assert take(mono, 1)[0].image.shape == (240, 320, 1)


def test_second_camera_on_the_same_producer_is_refused(opened):
    opened()
    with pytest.raises(SourceError, match="already in use"):
        GenicamCamera(make_cfg(serial="1")).open()


def test_resize_to_configured_size(opened):
    cam = opened(width=128, height=96)
    assert (cam.height, cam.width) == (96, 128)
    assert take(cam, 2)[1].image.shape == (96, 128, 3)


def test_device_by_serial_and_chunk_line_value(opened):
    cam = opened(serial="2", line_value_node="ChunkNrBounces")
    assert "serial 2" in cam.model
    frame = take(cam, 1)[0]
    assert isinstance(frame.meta.line_value, int)


def test_buffer_count_and_oldest_first(opened):
    cam = opened(buffer_count=5)
    gen = cam.frames(threading.Event())
    next(gen)  # acquiring now: the buffers are announced
    stream = cam._ia.data_streams[0].node_map
    assert stream.StreamBufferHandlingMode.value == "OldestFirst"
    assert stream.StreamAnnouncedBufferCount.value == 5
    gen.close()
    assert not cam._ia.is_acquiring()  # a consumer that stops early stops the acquisition


@pytest.mark.parametrize("nodes, words", [
    ({"Foo": 1}, ["'Foo'", "does not exist", "Viky"]),
    ({"Width": 5000}, ["'Width'", "5000", "out of range"]),
    ({"PixelFormat": "Bayer"}, ["'PixelFormat'", "'Bayer'", "not one of"]),
    ({"AspectRatio": 2.0}, ["'AspectRatio'", "read-only"]),
    ({"Width": "wide"}, ["'Width'", "'wide'", "convert"]),
])
def test_refused_nodes_are_source_errors_naming_the_node(nodes, words):
    cam = GenicamCamera(make_cfg(nodes=nodes))
    with pytest.raises(SourceError) as info:
        cam.open()
    for word in words:
        assert word in str(info.value)
    cam.close()


def test_missing_or_invalid_producer_and_device(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        GenicamCamera(make_cfg(cti=tmp_path / "nothing.cti")).open()
    junk = tmp_path / "junk.cti"
    junk.write_bytes(b"not a shared library")
    with pytest.raises(SourceError, match="cannot load"):
        GenicamCamera(make_cfg(cti=junk)).open()
    with pytest.raises(SourceError, match="serial '99'"):
        GenicamCamera(make_cfg(serial="99")).open()
    with pytest.raises(SourceError, match="device_index 7"):
        GenicamCamera(make_cfg(device_index=7)).open()


def test_software_trigger_needs_the_trigger_node():
    cam = GenicamCamera(make_cfg(software_trigger_fps=5.0))
    with pytest.raises(SourceError, match="TriggerSoftware"):
        cam.open()
    cam.close()


def test_sigint_handler_is_the_same_before_and_after_open():
    """Regression: harvesters' ImageAcquirer installs its own SIGINT handler on the main thread,
    which would swallow Ctrl-C / stop requests meant for the daemon."""
    assert threading.current_thread() is threading.main_thread()

    def ours(signum, frame):  # pragma: no cover - never delivered
        pass

    saved = signal.signal(signal.SIGINT, ours)
    try:
        cam = GenicamCamera(make_cfg())
        cam.open()
        assert signal.getsignal(signal.SIGINT) is ours
        take(cam, 1)
        cam.close()
        assert signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, saved)


def test_vanished_camera_is_reopened_and_ids_keep_increasing(opened):
    cam = opened()
    stop = threading.Event()
    ids = []
    for frame in cam.frames(stop):
        ids.append(frame.meta.frame_id)
        if len(ids) == 5:
            # the device goes away under the acquisition loop, as on a cable pull
            killer = threading.Thread(target=lambda: _destroy_acquirer(cam))
            killer.start()
            killer.join()
        if len(ids) == 15:
            break
    assert cam.status.reopen_count == 1
    assert cam.status.connected
    assert "destroyed" in cam.status.last_error
    assert all(b > a for a, b in zip(ids, ids[1:])), ids
    assert ids[5] == ids[4] + 1  # the new device restarts at 1; ids continue after the last


def test_free_running_camera_that_goes_silent_is_reopened(opened):
    cam = opened(fetch_timeout_s=0.05)
    stop = threading.Event()
    ids = []
    for frame in cam.frames(stop):
        ids.append(frame.meta.frame_id)
        if len(ids) == 3:
            with cam._lock:  # the camera stops streaming but still answers register reads
                cam._ia.remote_device.node_map.AcquisitionStop.execute()
        if len(ids) == 8:
            break
    assert cam.status.reopen_count == 1
    assert "no frame" in cam.status.last_error
    assert all(b > a for a, b in zip(ids, ids[1:])), ids


def _destroy_acquirer(cam: GenicamCamera) -> None:
    with cam._lock:
        cam._ia.destroy()


def test_reopen_retries_until_the_camera_is_back(opened, monkeypatch):
    cam = opened(reopen_backoff_s=(0.02, 0.1))
    real_connect = cam._connect
    tries: list[int] = []

    def flaky() -> None:
        tries.append(1)
        if len(tries) < 3:
            raise SourceError("device not enumerated yet")
        real_connect()

    monkeypatch.setattr(cam, "_connect", flaky)
    stop = threading.Event()
    ids = []
    for frame in cam.frames(stop):
        ids.append(frame.meta.frame_id)
        if len(ids) == 2:
            _destroy_acquirer(cam)
        if len(ids) == 6:
            break
    assert len(tries) == 3
    assert cam.status.reopen_count == 1 and cam.status.connected
    assert all(b > a for a, b in zip(ids, ids[1:])), ids


def test_stop_during_reopen_backoff_ends_frames(opened, monkeypatch):
    cam = opened(reopen_backoff_s=(0.05, 0.2))

    def refuse() -> None:
        raise SourceError("device unplugged")

    monkeypatch.setattr(cam, "_connect", refuse)
    stop = threading.Event()
    got: list[int] = []
    tried = threading.Event()

    def run() -> None:
        for frame in cam.frames(stop):
            got.append(frame.meta.frame_id)
            if len(got) == 2:
                _destroy_acquirer(cam)

    worker = threading.Thread(target=run, name="acq-test")
    worker.start()
    for _ in range(200):
        if "reopen failed" in cam.status.last_error:
            tried.set()
            break
        stop.wait(0.02)
    stop.set()
    worker.join(timeout=10)
    assert tried.is_set(), cam.status
    assert not worker.is_alive()
    assert not cam.status.connected
    assert cam.status.reopen_count == 0
    assert "device unplugged" in cam.status.last_error


def test_close_from_another_thread_ends_frames_and_is_idempotent(opened):
    cam = opened()
    stop = threading.Event()
    got: list[int] = []
    first = threading.Event()

    def run() -> None:
        for frame in cam.frames(stop):
            got.append(frame.meta.frame_id)
            first.set()

    worker = threading.Thread(target=run, name="acq-test")
    worker.start()
    assert first.wait(10)
    cam.close()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert cam.status.reopen_count == 0  # a close is not a vanished camera
    cam.close()
    assert not cam.status.connected


def test_deploy_example_config_is_valid_with_a_present_producer():
    from pathlib import Path

    from linewatch import config

    path = Path(__file__).resolve().parents[2] / "deploy" / "config.genicam.toml"
    text = path.read_text(encoding="utf-8")
    with pytest.raises(config.ConfigError, match="source.cti"):
        config.parse(text, path)  # the vendor producer is not installed here
    cti_line = next(ln for ln in text.splitlines() if ln.startswith("cti = "))
    cfg = config.parse(text.replace(cti_line, f'cti = "{CTI}"'), path)
    assert cfg.source.kind == "genicam" and cfg.lots.policy == "line"
