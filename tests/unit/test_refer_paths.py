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
