"""Referring data files keep working wherever they were built from: paths a builder makes relative
to the working directory are saved relative to the JSON file, which is how they are loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_synthetic_build_with_a_relative_out_path_loads_back(tmp_path, monkeypatch):
    from linewatch.refer import data as rdata

    monkeypatch.chdir(tmp_path)
    out = Path("var/refer/synth.json")  # relative, as `linewatch train build-refer --out var/...` passes it
    doc = rdata.build_synthetic(out.with_suffix(""), n_frames=6, seed=0, height=64, width=64)
    rdata.save(doc, out)
    monkeypatch.chdir("/")  # loading must not depend on the working directory
    loaded = rdata.load(tmp_path / out)
    for s in loaded["samples"]:
        assert Path(s["image"]).is_file(), s["image"]
        assert s["mask"] is None or Path(s["mask"]).is_file(), s["mask"]
    items = rdata.load_items(loaded, "train", (64, 64)) + rdata.load_items(loaded, "test", (64, 64))
    assert len(items) == len(loaded["samples"])
    assert all(isinstance(it.image, np.ndarray) for it in items)


def test_absolute_paths_stay_absolute(tmp_path):
    from linewatch.refer import data as rdata

    img = tmp_path / "a.png"
    doc = {"format": rdata.FORMAT, "samples": [{"image": str(img), "mask": None, "sentences": ["a crack"],
                                                "kind": "crack", "split": "train"}]}
    path = rdata.save(doc, tmp_path / "sub" / "doc.json")
    assert str(img) in path.read_text(encoding="utf-8")


def test_the_synthetic_referring_set_is_not_the_line_that_is_evaluated(tmp_path):
    """Regression: build-refer (seed 0) and `linewatch synth` / the daemon's default line (seed 0)
    rendered the same frames under other file names, so an evaluation met training frames."""
    from PIL import Image

    from linewatch.acquire.synthetic import SyntheticLine
    from linewatch.config import SyntheticSource
    from linewatch.refer import data as rdata

    doc = rdata.build_synthetic(tmp_path / "refer", n_frames=3, seed=0, height=64, width=64)
    line = SyntheticLine(SyntheticSource(width=64, height=64, channels=3, seed=0, fps=0))
    line.open()
    evaluated = [line.render(i)[0].squeeze() for i in range(3)]
    trained = [np.asarray(Image.open(s["image"])) for s in doc["samples"]]
    assert not any(np.array_equal(a, b) for a in evaluated for b in trained)
