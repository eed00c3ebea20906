"""The context level (``[engine] context_weight``): the stride-32 stage scored on its own coarse grid
and added to the patch scores (``linewatch.models.zeroshot.Scorer``), in the backbone, the engine
and the PGT samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from linewatch.config import ZeroShotEngine as EngineCfg
from linewatch.engines.zeroshot import ZeroShotEngine
from linewatch.frames import FrameMeta
from linewatch.models import zeroshot as zs
from linewatch.models.backbone import CONTEXT_CHANNELS, FEATURE_CHANNELS, PatchFeatures
from linewatch.refine.synth import make_samples

FINE, CTX = 3, 2


def _grids(n=6, h=16, w=16, seed=0):
    """Frames whose patch level is the same texture everywhere; frame 0 has a context region
    (rows and columns 4..11) that no other frame has."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        fine = 0.01 * torch.randn(FINE, h, w, generator=g)
        ctx = 0.01 * torch.randn(CTX, h, w, generator=g)
        if i == 0:
            ctx[:, 4:12, 4:12] += 1.0
        out.append(torch.cat([fine, ctx]))
    return out


def test_without_context_the_scorer_is_plain_mutual_scoring():
    grids = [g[:FINE] for g in _grids()]
    scorer = zs.Scorer(0.5)
    refs = [scorer.reference(g, 2, i) for i, g in enumerate(grids)]
    assert all(r.context is None for r in refs)
    want = zs.mutual_scores(zs.flat_patches(grids[0]), [r.patches for r in refs[1:]], 0.5).reshape(16, 16)
    assert torch.equal(scorer.score(grids[0], refs[1:]), want)
    assert all(torch.equal(a, b) for a, b in zip(scorer.score_lot(grids, 4, 2), zs.lot_mutual_scores(grids, 0.5, 4, 2)))
    assert torch.equal(scorer.score_self(grids[0]), zs.self_scores(grids[0]))


def test_context_finds_a_region_whose_patches_all_have_look_alikes():
    grids = _grids()
    plain = zs.Scorer(0.5, FINE, 0.0).score_lot(grids)[0]
    with_ctx = zs.Scorer(0.5, FINE, 1.0).score_lot(grids)[0]
    inside, outside = with_ctx[6:10, 6:10], with_ctx[:, 14:]
    assert float(inside.min()) > float(outside.max()) + 0.5  # the region stands out with context
    assert float(plain[6:10, 6:10].mean()) < float(plain.mean()) + 0.05  # and not without it
    # the context part is its own lot scores on every CONTEXT_STRIDE-th cell, upsampled and weighted
    scorer = zs.Scorer(0.5, FINE, 2.0)
    ctx = zs.lot_mutual_scores([scorer.context(g) for g in grids], 0.5)
    assert ctx[0].shape == (4, 4)
    up = F.interpolate(ctx[0][None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(scorer.score_lot(grids)[0], plain + 2.0 * up, atol=1e-5)


def test_frame_scores_and_references_carry_both_levels():
    grids = _grids()
    scorer = zs.Scorer(0.5, FINE, 1.0)
    refs = [scorer.reference(g, 2, i) for i, g in enumerate(grids)]
    assert refs[1].patches.shape == (64, FINE)  # the patch level subsampled by 2
    assert refs[1].context.shape == (16, CTX)  # the context level at its native 4 x 4 cells
    s = scorer.score(grids[0], refs[1:])
    assert s.shape == (16, 16)
    assert float(s[6:10, 6:10].min()) > float(s[:, 14:].max()) + 0.5
    alone = scorer.score_self(grids[0])
    assert alone.shape == (16, 16) and bool(torch.isfinite(alone).all())


class ContextExtractor:
    """A fake extractor with a patch level (pooled pixels) and a context level (pooled 4x wider)."""

    def __init__(self, fine=FEATURE_CHANNELS, ctx=CONTEXT_CHANNELS):
        self.fine, self.ctx = fine, ctx

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(batch)
        f = F.avg_pool2d(t, 8)
        c = F.interpolate(F.avg_pool2d(t, 32), size=f.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([f.repeat(1, self.fine // 3 + 1, 1, 1)[:, :self.fine],
                          c.repeat(1, self.ctx // 3 + 1, 1, 1)[:, :self.ctx]], 1).numpy()


def _frames(n, defect_at=None):
    rng = np.random.default_rng(0)
    base = rng.integers(90, 110, (128, 128, 3), dtype=np.uint8)
    out = [base.copy() for _ in range(n)]
    if defect_at is not None:
        out[defect_at][32:96, 32:96] = 160  # a large, even patch
    return out


def _metas(n, lot="a"):
    return [FrameMeta(i, 0.0, "cam", 128, 128, lot_id=lot) for i in range(n)]


def test_engine_scores_both_levels_and_names_the_weight_in_its_version():
    cfg = EngineCfg(input_size=128, reference_frames=4, context_weight=1.0, tier2_references=8)
    eng = ZeroShotEngine(cfg, extractor=ContextExtractor())
    assert eng.scorer.has_context and eng.scorer.fine_channels == FEATURE_CHANNELS
    assert eng.version.endswith("-c1")
    eng.infer(_frames(8, defect_at=3), _metas(8))
    out = eng.lot_closed("a")
    scores = [out[i].image_score for i in range(8)]
    assert int(np.argmax(scores)) == 3
    plain = ZeroShotEngine(EngineCfg(input_size=128, reference_frames=4), extractor=ContextExtractor(ctx=0))
    assert not plain.scorer.has_context and "-c" not in plain.version.rsplit("-p", 1)[1]


def test_engine_refuses_an_extractor_without_the_context_channels():
    cfg = EngineCfg(input_size=128, context_weight=1.0)
    eng = ZeroShotEngine(cfg, extractor=ContextExtractor(ctx=0))
    with pytest.raises(RuntimeError, match="context channels"):
        eng.infer(_frames(2), _metas(2))


def test_pgt_samples_are_scored_with_both_levels_and_keep_the_patch_level():
    ext = ContextExtractor(fine=3, ctx=2)
    images = _frames(4)
    feats = [torch.from_numpy(f) for f in ext(np.stack([(im.transpose(2, 0, 1) - 127.0) / 128.0 for im in images]).astype(np.float32))]
    scorer = zs.Scorer(0.5, 3, 1.0)
    refs = [scorer.reference(f, 2, i) for i, f in enumerate(feats)]
    z = [torch.zeros(16, 16) for _ in images]

    def extract(frames):
        b = np.stack([(im.transpose(2, 0, 1) - 127.0) / 128.0 for im in frames]).astype(np.float32)
        return [torch.from_numpy(f) for f in ext(b)]

    out = make_samples(images, [scorer.fine(f) for f in feats], refs, z, [0, 1], 1.0, 4, extract, scorer,
                       np.random.default_rng(0), normal_share=0.0)
    assert len(out) == 4
    assert all(s.feat.shape == (3, 16, 16) and s.z.shape == (16, 16) for s in out)


def test_backbone_context_level_appends_the_stride_32_stage():
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain, ctx = PatchFeatures(), PatchFeatures(context=True)
    assert "s8s16s32" in ctx.version and ctx.channels == FEATURE_CHANNELS + CONTEXT_CHANNELS
    with torch.inference_mode():
        a, b = plain(x), ctx(x)
    assert b.shape == (1, FEATURE_CHANNELS + CONTEXT_CHANNELS, 8, 8)
    assert torch.allclose(b[:, :FEATURE_CHANNELS], a)  # the patch level is unchanged
    assert float(b[:, FEATURE_CHANNELS:].abs().sum()) > 0
