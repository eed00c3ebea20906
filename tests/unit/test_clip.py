"""CLIP engine: the real loading and scoring code, on a small randomly initialised CLIP of the
standard architecture (transformers' CLIPModel from a small config) saved to a temp folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from linewatch.config import ClipEngine as ClipCfg  # noqa: E402
from linewatch.config import Config, RecipePrompts  # noqa: E402
from linewatch.engines import EngineUnavailable, create_engine  # noqa: E402
from linewatch.frames import FrameMeta  # noqa: E402


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet (every byte maps to a printable character)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP (ViT 64 px / 16 px patches, 2-layer text transformer) in Hugging Face layout."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    chars = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    d = tmp_path_factory.mktemp("clip_tiny")
    model.save_pretrained(d)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    return d, {k: v.clone() for k, v in model.state_dict().items()}


def _meta(h, w, recipe="default"):
    return FrameMeta(frame_id=1, t_capture=0.0, camera="c", height=h, width=w, recipe=recipe)


def test_loader_reads_the_saved_weights_exactly(clip_dir):
    from linewatch.models.clip import ClipScorer

    path, state = clip_dir
    scorer = ClipScorer.from_folder(path)
    loaded = scorer.model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert scorer.grid == 4


def test_engine_scores_patches_against_prompts(clip_dir):
    path, _ = clip_dir
    cfg = Config.model_validate({"engine": {"kind": "clip", "weights": str(path), "threads": 1}}).engine
    eng = create_engine(cfg)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (90, 130, 3), np.uint8), rng.integers(0, 255, (40, 40, 1), np.uint8)]
    outs = eng.infer(imgs, [_meta(90, 130), _meta(40, 40)])
    assert outs[0].score_map.shape == (90, 130) and outs[1].score_map.shape == (40, 40)
    for o in outs:
        assert o.mask is None  # the inspector thresholds CLIP maps
        assert np.isfinite(o.score_map).all() and 0 <= o.score_map.min() <= o.score_map.max() <= 1
        assert o.image_score == pytest.approx(float(o.score_map.max()))
    again = eng.infer(imgs[:1], [_meta(90, 130)])[0]
    np.testing.assert_allclose(again.score_map, outs[0].score_map, atol=1e-6)
    # the prompts matter: another recipe's anomalous prompts give another map
    cfg2 = cfg.model_copy(update={"recipes": {"b": RecipePrompts(defects=["zzz qqq"], templates=["{defect}"])}})
    eng2 = create_engine(cfg2)
    other = eng2.infer(imgs[:1], [_meta(90, 130, recipe="b")])[0]
    assert np.abs(other.score_map - outs[0].score_map).max() > 1e-4
    normal, anomalous = eng2.sentences(imgs[0], "b")
    assert anomalous == ["zzz qqq"] and all("product" not in s for s in normal)


def test_missing_weights_path_is_refused_clearly(tmp_path):
    cfg = ClipCfg(weights=tmp_path / "nope")
    with pytest.raises(EngineUnavailable, match="CLIP weights folder not found: .*nope"):
        create_engine(cfg)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(EngineUnavailable, match="has none of"):
        create_engine(ClipCfg(weights=tmp_path / "half"))
