"""Pure logic of the GenICam source: pixel-format conversion, resizing, frame-id continuity."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("harvesters", reason="the genicam source needs harvesters")

from linewatch.acquire.genicam import (  # noqa: E402
    FrameIdSequencer, Resizer, bayer_to_rgb, convert_pixels, fit_channels, is_supported)


@pytest.mark.parametrize("fmt, ok", [
    ("Mono8", True), ("Mono10", True), ("Mono12p", True), ("Mono12Packed", True),
    ("Mono16", True), ("RGB8", True), ("BGRa8", True), ("BayerRG8", True), ("BayerGB12", True),
    ("YCbCr422_8", False), ("Coord3D_C16", False), ("RGB8Planar", False), ("", False),
])
def test_supported_formats(fmt, ok):
    assert is_supported(fmt) is ok


def test_mono8_keeps_values():
    data = np.arange(12, dtype=np.uint8)
    out = convert_pixels(data, "Mono8", 3, 4)
    assert out.shape == (3, 4) and out.dtype == np.uint8
    assert out[2, 3] == 11


@pytest.mark.parametrize("fmt, full", [("Mono10", 1023), ("Mono12", 4095), ("Mono16", 65535)])
def test_deep_mono_is_scaled_to_8_bits(fmt, full):
    data = np.array([0, full // 2 + 1, full, full], dtype=np.uint16)
    out = convert_pixels(data, fmt, 2, 2)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 128], [255, 255]]


def test_bgr_and_alpha_become_rgb():
    pixel = np.array([10, 20, 30, 99], dtype=np.uint8)  # B, G, R, alpha
    out = convert_pixels(np.tile(pixel, 6), "BGRa8", 2, 3)
    assert out.shape == (2, 3, 3)
    assert out[1, 2].tolist() == [30, 20, 10]
    rgb = convert_pixels(np.tile(pixel[:3], 6), "RGB8", 2, 3)
    assert rgb[0, 0].tolist() == [10, 20, 30]


def test_short_buffer_is_an_error():
    with pytest.raises(ValueError, match="needs 12"):
        convert_pixels(np.zeros(11, np.uint8), "Mono8", 3, 4)


@pytest.mark.parametrize("pattern, cell", [
    ("RG", [[200, 100], [100, 50]]), ("BG", [[50, 100], [100, 200]]),
    ("GR", [[100, 200], [50, 100]]), ("GB", [[100, 50], [200, 100]]),
])
def test_bayer_cells_give_red_green_blue(pattern, cell):
    mosaic = np.tile(np.array(cell, dtype=np.uint8), (2, 3))[:3, :5]  # odd size on purpose
    out = bayer_to_rgb(mosaic, pattern)
    assert out.shape == (3, 5, 3)
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[2, 4].tolist() == [200, 100, 50]


def test_fit_channels_replicates_mono_and_takes_luma_of_rgb():
    mono = np.array([[0, 255]], dtype=np.uint8)
    assert fit_channels(mono, 3).shape == (1, 2, 3)
    assert fit_channels(mono, 3)[0, 1].tolist() == [255, 255, 255]
    assert fit_channels(mono, 1).shape == (1, 2, 1)
    rgb = np.array([[[255, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    luma = fit_channels(rgb, 1)
    assert luma.shape == (1, 2, 1)
    assert luma[0, 0, 0] == 76 and luma[0, 1, 0] == 255


def test_resizer_picks_nearest_source_pixels():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    half = Resizer((4, 4), (2, 2))(img)
    assert half[..., 0].tolist() == [[5, 7], [13, 15]]
    double = Resizer((4, 4), (8, 6))(img)
    assert double.shape == (8, 6, 1)
    assert double[0, 0, 0] == 0 and double[-1, -1, 0] == 15


def test_frame_ids_keep_device_gaps_and_never_go_back():
    """Regression: a reopened device restarts its counter at 1, which the daemon would read as
    ids going backwards (duplicate frames); ids must continue after the last one given out."""
    seq = FrameIdSequencer()
    assert [seq.next(i) for i in (1, 2, 5)] == [1, 2, 5]  # the gap 3-4 is camera-side loss
    assert [seq.next(i) for i in (1, 2, 4)] == [6, 7, 9]  # device restarted after a reopen
    assert seq.next(4) == 10  # a repeated id is moved on, not repeated


def test_a_16_bit_block_id_wrap_keeps_the_frames_lost_across_it_as_a_gap():
    """Regression: a GigE Vision 1.x block id runs ... 65535, 1, 2 (0 is not an id). The ids used
    to continue after the last one with no gap, so frames lost across the wrap were not counted."""
    seq = FrameIdSequencer()
    assert [seq.next(i) for i in (65533, 65534, 65535, 1, 2)] == [65533, 65534, 65535, 65536, 65537]
    assert seq.wraps == 1
    seq = FrameIdSequencer()
    # 65535 and 1..2 lost: a gap of 3 ids across the wrap, as the daemon counts camera loss
    assert [seq.next(i) for i in (65533, 65534, 3, 4)] == [65533, 65534, 65538, 65539]
    # a device counting from 0 wraps with no gap either
    seq = FrameIdSequencer()
    assert [seq.next(i) for i in (65534, 65535, 0, 1)] == [65534, 65535, 65536, 65537]
    # and one known to count from 0 (it sent id 0) that lost its 0 across the wrap shows it
    seq = FrameIdSequencer()
    assert [seq.next(i) for i in (0, 65534, 65535, 1)] == [0, 65534, 65535, 65537]  # 0 lost: one id


def test_a_reopened_device_near_the_end_of_its_counter_is_not_taken_for_a_wrap():
    seq = FrameIdSequencer()
    assert [seq.next(i) for i in (65530, 65531)] == [65530, 65531]
    seq.reopened()
    assert [seq.next(i) for i in (5, 6)] == [65532, 65533]  # no gap: a restart, counted as a reopen
    assert seq.wraps == 0


def test_frame_ids_without_a_device_counter_are_counted_locally():
    seq = FrameIdSequencer()
    assert [seq.next(None) for _ in range(3)] == [0, 1, 2]


def test_an_empty_or_odd_buffer_is_a_fault_frame_not_a_lost_camera():
    """Errors from decoding one buffer stay inside it: a blank frame with a reason (FAULT),
    never an exception that frames() would take for camera loss."""
    from types import SimpleNamespace

    from linewatch.acquire.genicam import GenicamCamera

    cam = SimpleNamespace(height=4, width=6, channels=1, _resizer=None)

    def buffer(h, w, data):
        return SimpleNamespace(payload=SimpleNamespace(components=[
            SimpleNamespace(data_format="Mono8", height=h, width=w, data=data)]))

    img, fault = GenicamCamera._pixels(cam, buffer(0, 0, np.zeros(0, np.uint8)))
    assert img.shape == (4, 6, 1) and not img.any() and fault == "undecodable: empty 0x0 image"
    img, fault = GenicamCamera._pixels(cam, buffer(2, 3, np.full(6, 7, np.uint8)))  # resized up
    assert fault == "" and img.shape == (4, 6, 1) and (img == 7).all()
