"""Data-set layouts: which file is an image's mask, how a mask is read, and a stable order,
on small made-up folders (the real data sets are read in the integration tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linewatch import datasets as ds


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


def _palette(path: Path, colours, background: int, mark: int) -> Path:
    im = Image.fromarray(np.where(_square(1) > 0, mark, background).astype(np.uint8), "P")
    im.putpalette([c for rgb in colours for c in rgb])
    im.save(path)
    return path


def _square(value, dtype=np.uint8, shape=(16, 16)) -> np.ndarray:
    m = np.zeros(shape, dtype)
    m[4:8, 4:8] = value
    return m


@pytest.mark.parametrize("make", [
    lambda p: _png(p, _square(255)),  # the usual 0/255
    lambda p: _png(p, _square(1)),  # 0/1
    lambda p: _png(p, _square(1, np.uint16)),  # 16-bit 0/1
    lambda p: _png(p, _square(65535, np.uint16)),  # 16-bit 0/65535
    lambda p: _png(p, np.stack([_square(255), _square(0), _square(0), np.full((16, 16), 255, np.uint8)], -1)),  # red RGBA
    lambda p: _png(p, _square(4095, np.uint16)),  # 12-bit 0/4095 in a 16-bit file
    lambda p: _palette(p, [(255, 255, 255), (0, 0, 0)], background=1, mark=0),  # white mark at index 0
    lambda p: _palette(p, [(0, 0, 0), (128, 128, 128), (255, 255, 255)], background=0, mark=2),
], ids=["0-255", "0-1", "16bit-0-1", "16bit-full", "red-rgba", "12bit", "palette-white-0", "palette-index-2"])
def test_every_mask_convention_marks_the_same_pixels_and_labels_the_image_defective(tmp_path, make):
    """The label (defective or not) and the ground truth are read by one rule: a 0/1 mask used to
    label its image defective with an empty ground truth (grey > 127 found nothing)."""
    item = tmp_path / "kos01"
    item.mkdir()
    _png(item / "Part0.png", np.full((16, 16), 90, np.uint8))
    make(item / "Part0_mask.png")
    _png(item / "Part1.png", np.full((16, 16), 90, np.uint8))
    (s0, s1) = ds.list_samples(tmp_path, "kolektor")
    assert (s0.kind, s1.kind) == ("defect", "good")
    gt = ds.load_mask(s0.mask, (16, 16))
    assert gt.sum() == 16 and gt[4:8, 4:8].all()


def test_real_masks_read_as_before():
    """The rule keeps the real data sets' ground truth: 0/255 masks with smoothed edges > 127."""
    mt = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "magnetic_tile" / "blowhole"
    if not mt.is_dir():
        pytest.skip(f"magnetic_tile not found at {mt}")
    for m in sorted(mt.glob("*_mask.png"))[:5]:
        with Image.open(m) as im:
            assert (ds.mask_pixels(im) == (np.asarray(im.convert("L")) > 127)).all()


def test_masks_are_found_in_any_letter_case_and_kolektors_own_label_name(tmp_path):
    """``Part1_mask.PNG`` was not found on Linux (found on Windows: labels differed by machine);
    ``Part2_label.bmp`` (KolektorSDD's own naming) was listed as an extra defect-free image."""
    item = tmp_path / "kos01"
    item.mkdir()
    for k in range(4):
        _png(item / f"Part{k}.png", np.full((16, 16), 90, np.uint8))
    _png(item / "Part0_mask.png", _square(255))
    _png(item / "Part1_mask.PNG", _square(255))
    _png(item / "Part2_label.bmp", _square(255))
    samples = ds.list_samples(tmp_path, "kolektor")
    assert [(s.image.name, s.kind) for s in samples] == [
        ("Part0.png", "defect"), ("Part1.png", "defect"), ("Part2.png", "defect"), ("Part3.png", "good")]
    assert [s.mask.name for s in samples[:3]] == ["Part0_mask.png", "Part1_mask.PNG", "Part2_label.bmp"]


def test_order_does_not_depend_on_the_listing_order(tmp_path):
    """``img01`` and ``img1`` have the same natural key; the name breaks the tie."""
    for name in ("img1.png", "img01.png", "img2.png", "img10.png"):
        _png(tmp_path / name, np.zeros((4, 4), np.uint8))
    names = [s.image.name for s in ds.list_samples(tmp_path, "flat")]
    assert names == ["img01.png", "img1.png", "img2.png", "img10.png"]
    assert sorted(reversed([tmp_path / n for n in names]), key=ds._natural_key) == [tmp_path / n for n in names]


def test_synth_refuses_zero_frames_which_would_run_for_ever(tmp_path, capsys):
    from linewatch.cli import main

    for bad in (["--frames", "0"], ["--lot-size", "-2"]):
        with pytest.raises(SystemExit) as exc:
            main(["synth", str(tmp_path / "out"), *bad])
        assert exc.value.code == 2
        assert "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_refuses_a_corrupt_mask_before_any_inference(tmp_path, capsys):
    from linewatch.cli import main

    item = tmp_path / "kos01"
    item.mkdir()
    for k in range(3):
        _png(item / f"Part{k}.png", np.full((16, 16), 90, np.uint8))
    _png(item / "Part0_mask.png", _square(255))
    (item / "Part1_mask.png").write_bytes(b"not a png at all")
    assert main(["eval", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "Part1_mask.png" in capsys.readouterr().out
    item2 = tmp_path / "kos01" / "Part1_mask.png"
    item2.unlink()
    _png(item / "Part2.png", np.full((8, 8), 90, np.uint8))  # its mask below is 16 x 16
    _png(item / "Part2_mask.png", _square(255))
    assert main(["eval", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    out = capsys.readouterr().out
    assert "Part2_mask.png" in out and "cannot read data" in out
    assert not (tmp_path / "r").exists()
