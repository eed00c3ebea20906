"""The CLIP engine on real images (magnetic_tile, KolektorSDD) through the registry, with a small
randomly initialised CLIP of the standard architecture written to a temp folder (no real CLIP
weights exist on these machines; the loading and scoring code is the production one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from linewatch.config import Config  # noqa: E402
from linewatch.engines import create_engine  # noqa: E402
from linewatch.frames import FrameMeta  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.skipif(not (DATA / "magnetic_tile").is_dir() or not (DATA / "kolektorsdd").is_dir(),
                    reason=f"shared data not found under {DATA}")
def test_clip_engine_scores_real_frames_of_their_own_size(tmp_path):
    from linewatch.datasets import load_image
    from linewatch.models.clip import write_random_clip

    weights = write_random_clip(tmp_path / "clip")
    cfg = Config.model_validate({"engine": {"kind": "clip", "weights": str(weights), "threads": 1,
                                            "recipes": {"kos": {"product": "commutator"}}}}).engine
    eng = create_engine(cfg)
    paths = [sorted((DATA / "magnetic_tile" / "crack").glob("*.jpg"))[0],
             sorted((DATA / "kolektorsdd").glob("kos*/Part*.jpg"))[0]]
    imgs = [load_image(p, channels=1) for p in paths]
    metas = [FrameMeta(frame_id=i, t_capture=0.0, camera="c", height=im.shape[0], width=im.shape[1],
                       recipe="kos" if i else "default") for i, im in enumerate(imgs)]
    eng.warmup(imgs[0].shape[0], imgs[0].shape[1], 1)
    outs = eng.infer(imgs, metas)
    for im, o in zip(imgs, outs):
        assert o.score_map.shape == im.shape[:2] and o.mask is None
        assert np.isfinite(o.score_map).all() and 0.0 <= o.image_score <= 1.0
    normal, anomalous = eng.sentences(imgs[1], "kos")
    assert all("commutator" in s for s in normal + anomalous)
