"""The replay source on small folders in tmp_path (flat, MVTec-style, corrupt files) and on the
shared kolektorsdd set when it is present."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linewatch.acquire.base import SourceError, SourceFrame
from linewatch.acquire.replay import ReplayFolder
from linewatch.config import ReplaySource

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write_png(path: Path, h: int, w: int, value: int = 100, mask: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w), value, np.uint8)
    if mask:
        arr[:] = 0
        arr[h // 4: h // 2, w // 4: w // 2] = 255
    Image.fromarray(arr).save(path)


def take(src: ReplayFolder, n: int | None = None) -> list[SourceFrame]:
    stop = threading.Event()
    out = []
    for f in src.frames(stop):
        out.append(f)
        if n is not None and len(out) >= n:
            stop.set()
    return out


def opened(path: Path, **kw) -> ReplayFolder:
    src = ReplayFolder(ReplaySource(path=path, **kw))
    src.open()
    return src


def test_flat_folder_resized_to_first_image(tmp_path):
    write_png(tmp_path / "a.png", 40, 60, 10)
    write_png(tmp_path / "b.png", 20, 30, 200)
    src = opened(tmp_path)
    assert (src.height, src.width) == (40, 60)
    frames = take(src)
    assert [f.meta.frame_id for f in frames] == [0, 1]
    assert all(f.image.shape == (40, 60, 3) for f in frames)
    assert frames[1].image.mean() == pytest.approx(200, abs=1)
    assert frames[0].gt is None and not frames[0].meta.has_gt  # flat layout: no ground truth
    assert frames[0].meta.source_ref == str(tmp_path / "a.png")
    assert frames[0].meta.extra["kind"] == "good"


def test_configured_size_and_mono(tmp_path):
    write_png(tmp_path / "a.png", 40, 60)
    src = opened(tmp_path, width=32, height=24, channels=1)
    (f,) = take(src)
    assert f.image.shape == (24, 32, 1) and f.image.dtype == np.uint8


def test_mvtec_layout_carries_resized_masks(tmp_path):
    root = tmp_path / "bottle"
    write_png(root / "test" / "good" / "000.png", 64, 64)
    write_png(root / "test" / "crack" / "000.png", 64, 64)
    write_png(root / "ground_truth" / "crack" / "000_mask.png", 64, 64, mask=True)
    src = opened(root, width=32, height=32)
    frames = {f.meta.extra["kind"]: f for f in take(src)}
    assert set(frames) == {"good", "crack"}
    assert frames["good"].meta.has_gt and not frames["good"].gt.any()
    gt = frames["crack"].gt
    assert gt.shape == (32, 32) and gt.dtype == bool
    assert gt[8:16, 8:16].all() and gt.sum() == 64
    assert frames["crack"].meta.extra["group"] == "bottle"


def test_corrupt_file_gives_a_fault_frame_and_replay_continues(tmp_path, caplog):
    write_png(tmp_path / "a.png", 16, 16)
    (tmp_path / "x.png").write_bytes(b"\x00garbage, not a png" * 10)
    write_png(tmp_path / "z.png", 16, 16)
    src = opened(tmp_path)
    with caplog.at_level(logging.WARNING, logger="linewatch.acquire.replay"):
        frames = take(src)
    assert [f.meta.frame_id for f in frames] == [0, 1, 2]
    bad = frames[1]
    assert bad.meta.extra["fault"].startswith(f"corrupt image: {tmp_path / 'x.png'}: ")
    assert bad.image.shape == (16, 16, 3) and not bad.image.any()
    assert "fault" not in frames[0].meta.extra and "fault" not in frames[2].meta.extra
    assert src.status.corrupt_frames == 1
    assert "corrupt image" in caplog.text


def test_loop_continues_frame_ids(tmp_path):
    for name in "abc":
        write_png(tmp_path / f"{name}.png", 8, 8)
    src = opened(tmp_path, loop=True)
    frames = take(src, 8)
    assert [f.meta.frame_id for f in frames] == list(range(8))
    assert [Path(f.meta.source_ref).name for f in frames[:4]] == ["a.png", "b.png", "c.png", "a.png"]
    assert frames[3].meta.extra["loop"] == 1


def test_shuffle_seed_is_a_fixed_permutation(tmp_path):
    for i in range(12):
        write_png(tmp_path / f"{i:02d}.png", 8, 8)
    order = [[f.meta.source_ref for f in take(opened(tmp_path, shuffle_seed=s))] for s in (1, 1, None)]
    assert order[0] == order[1] and sorted(order[0]) == order[2] and order[0] != order[2]


def test_fps_paces_replay(tmp_path):
    for i in range(20):
        write_png(tmp_path / f"{i:02d}.png", 8, 8)
    t0 = time.monotonic()
    assert len(take(opened(tmp_path, fps=200.0))) == 20
    assert time.monotonic() - t0 >= 0.09


def test_missing_or_empty_folder_fails_at_open(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        ReplayFolder(ReplaySource(path=tmp_path / "nope")).open()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        ReplayFolder(ReplaySource(path=tmp_path / "empty")).open()


def test_all_unreadable_without_size_fails_at_open(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="width and height"):
        opened(tmp_path)
    (f,) = take(opened(tmp_path, width=8, height=8))  # with a size, it plays as a FAULT frame
    assert "fault" in f.meta.extra


@pytest.mark.skipif(not (DATA / "kolektorsdd").is_dir(), reason=f"shared data absent: {DATA / 'kolektorsdd'}")
def test_kolektorsdd_masks_for_defective_parts():
    src = opened(DATA / "kolektorsdd", width=128, height=320, channels=1)
    frames = take(src, 40)  # the first five items (kos01..kos05)
    assert all(f.meta.has_gt and f.gt.shape == (320, 128) for f in frames)
    assert {f.meta.extra["group"] for f in frames} == {f"kos{i:02d}" for i in range(1, 6)}
    defective = [f for f in frames if f.meta.extra["kind"] == "defect"]
    good = [f for f in frames if f.meta.extra["kind"] == "good"]
    assert defective and good
    assert all(f.gt.any() for f in defective)
    assert not any(f.gt.any() for f in good)


def test_a_mask_of_another_size_than_its_image_is_an_error_unless_resizing(tmp_path):
    from PIL import Image

    from linewatch.datasets import load_mask, resize_mask

    m = np.zeros((20, 10), np.uint8)
    m[2:5, 3:6] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", (20, 10)).sum() == 9
    with pytest.raises(ValueError, match="is 10x20, its image 20x10"):
        load_mask(tmp_path / "m.png", (10, 20))  # transposed
    assert resize_mask(load_mask(tmp_path / "m.png", (20, 10)), (40, 20)).sum() == 36


def test_an_mvtec_category_is_streamed_in_a_fixed_shuffled_order_a_kolektor_item_in_its_own():
    """Regression: an MVTec category went through `linewatch eval` kind after kind, so each frame's
    tier-1 references were frames with its own kind of defect."""
    from types import SimpleNamespace

    from linewatch.datasets import Sample
    from linewatch.evaluate import _lots

    kinds = ["crack"] * 10 + ["good"] * 10 + ["hole"] * 10
    samples = [Sample(Path(f"{k}/{i:03d}.png"), None, k, "bottle", True) for i, k in enumerate(kinds)]
    args = SimpleNamespace(lots="group", seed=0, lot_size=32)
    (lot,) = _lots(args, samples, "mvtec")
    assert sorted(s.image.name for s in lot) == sorted(s.image.name for s in samples)
    assert [s.kind for s in lot] != kinds, "not in folder order"
    assert _lots(args, samples, "mvtec") == [lot], "the same order every run"
    (item,) = _lots(args, samples, "kolektor")
    assert item == samples


def test_a_decompression_bomb_is_a_fault_frame_not_a_dead_source(tmp_path):
    """Regression: Pillow refuses an image over ~179 MP (or a corrupt header claiming one) with
    DecompressionBombError, which is no OSError: it killed the source, and systemd restarted
    the daemon into the same file for ever."""
    import struct
    import zlib

    write_png(tmp_path / "a.png", 16, 16)
    raw = (tmp_path / "a.png").read_bytes()
    ihdr = struct.pack(">IIBBBBB", 14000, 14000, 8, 0, 0, 0, 0)  # a header claiming 196 MP
    bomb = raw[:8] + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + raw[33:]
    (tmp_path / "b.png").write_bytes(bomb)
    src = opened(tmp_path)
    frames = take(src)
    assert [f.meta.frame_id for f in frames] == [0, 1]
    assert frames[1].meta.extra["fault"].startswith(f"corrupt image: {tmp_path / 'b.png'}")
    first = tmp_path / "first"  # the frame size is taken from the first image that can be read
    first.mkdir()
    (first / "0.png").write_bytes(bomb)
    write_png(first / "1.png", 12, 20)
    assert (opened(first).height, opened(first).width) == (12, 20)


def test_a_16_bit_image_is_scaled_not_clipped_to_white(tmp_path):
    """Regression: a Mono12/Mono16 recording converted to 8 bits by clipping: 99 % white frames
    that were inspected as if real."""
    from linewatch.datasets import load_image, to_8bit

    arr = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 4096).astype(np.uint16)  # 12-bit values
    Image.fromarray(arr).save(tmp_path / "mono12.png")
    img = load_image(tmp_path / "mono12.png", channels=1, bit_depth=12)
    assert img.dtype == np.uint8 and img.max() == 255 and img.min() == 0
    assert 100 < img.mean() < 155  # a ramp, not a white frame
    assert load_image(tmp_path / "mono12.png", channels=1).max() == 16  # the file's depth: 16 bits
    assert to_8bit(np.array([0, 65535], np.uint16)).tolist() == [0, 255]
    assert to_8bit(np.array([0.0, 0.5, 1.0], np.float32)).tolist() == [0, 128, 255]
    # one scale for every frame: a frame's brightest pixel does not change its gain
    dim, bright = np.full(4, 500, np.uint16), np.full(4, 500, np.uint16)
    dim[0], bright[0] = 1000, 1100
    assert to_8bit(dim, 12)[1] == to_8bit(bright, 12)[1] == 31
    src = opened(tmp_path, channels=1, bit_depth=12)
    assert take(src)[0].image.max() == 255


def test_a_recording_with_a_subfolder_replays_its_own_images(tmp_path, caplog):
    """Regression: any subfolder with an image (rejects/) turned a flat folder into the kinds
    layout, and only the subfolder's images were replayed."""
    for name in "abcde":
        write_png(tmp_path / f"{name}.png", 8, 8)
    write_png(tmp_path / "rejects" / "r0.png", 8, 8)
    with caplog.at_level(logging.WARNING, logger="linewatch.datasets"):
        frames = take(opened(tmp_path))
    assert [Path(f.meta.source_ref).name for f in frames] == [f"{n}.png" for n in "abcde"]
    assert "subfolders are left out" in caplog.text


def test_a_folder_the_layout_cannot_list_fails_at_open_as_a_source_error(tmp_path):
    """Regression: a corrupt ground-truth mask read while listing (or a folder the service user may
    not read) raised past open(): no 'reopen the previous source' at a reload."""
    write_png(tmp_path / "kos01" / "Part0.png", 16, 16)
    (tmp_path / "kos01" / "Part0_mask.png").write_bytes(b"")  # a zero-byte mask
    with pytest.raises(SourceError, match="replay source"):
        opened(tmp_path)


def test_any_failure_to_open_a_source_is_a_start_up_error():
    """Regression: only SourceError was a start-up error. Anything else (a folder the service
    user may not read) skipped, at a reload, the branch that reopens the previous source, and the
    daemon ran on with no acquisition while the watchdog was fed."""
    from types import SimpleNamespace

    from linewatch import daemon as dm

    def refused(cfg):
        raise PermissionError(13, "Permission denied", "/srv/recordings")

    cfg = SimpleNamespace(source=SimpleNamespace(kind="replay"))
    real = dm.create_source
    dm.create_source = refused
    try:
        with pytest.raises(dm.StartupError, match=r"source \(replay\): PermissionError"):
            dm.Daemon._open_source(SimpleNamespace(), cfg)
    finally:
        dm.create_source = real
