"""The shipped default engine really finds defects on the shipped default line: a floor on tier-1
pixel- and image-AUROC, computed from the real EfficientNet-Lite0 weights on synthetic frames
whose masks are exact. Guards against a change that keeps every frame "answered" but blind."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from linewatch import metrics as mx
from linewatch.acquire import create_source
from linewatch.config import SyntheticSource, ZeroShotEngine as EngineCfg
from linewatch.engines import create_engine

pytestmark = pytest.mark.integration


def test_default_engine_on_the_synthetic_line_beats_the_quality_floor():
    src = create_source(SyntheticSource(width=128, height=128, defect_rate=0.3, seed=11, n_frames=48, fps=0))
    src.open()
    frames = list(src.frames(threading.Event()))
    src.close()
    engine = create_engine(EngineCfg(threads=2))
    engine.warmup(128, 128, 3)
    maps, masks, labels, scores = [], [], [], []
    for s in range(0, len(frames), 4):
        chunk = frames[s:s + 4]
        for f in chunk:
            f.meta.lot_id = f"lot{f.meta.frame_id // 24}"
        outs = engine.infer([f.image for f in chunk], [f.meta for f in chunk])
        for f, o in zip(chunk, outs):
            maps.append(o.score_map)
            masks.append(f.gt)
            labels.append(bool(f.gt.any()))
            scores.append(o.image_score)
    assert 5 <= sum(labels) <= 30, "the synthetic line should mix good and defective parts"
    pix = mx.auroc(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    img = mx.auroc(np.array(labels), np.array(scores))
    assert pix >= 0.85, pix
    assert img >= 0.85, img
