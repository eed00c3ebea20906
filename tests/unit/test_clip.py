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


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP (ViT 64 px / 16 px patches, 2-layer text transformer) in Hugging Face layout."""
    from safetensors.torch import load_file

    from linewatch.models.clip import write_random_clip

    d = write_random_clip(tmp_path_factory.mktemp("clip_tiny"))
    return d, load_file(str(d / "model.safetensors"))


def _meta(h, w, recipe="default"):
    return FrameMeta(frame_id=1, t_capture=0.0, camera="c", height=h, width=w, recipe=recipe)


def test_loader_reads_the_saved_weights_exactly(clip_dir):
    from linewatch.models.clip import ClipScorer

    path, state = clip_dir
    scorer = ClipScorer.from_folder(path)
    loaded = scorer.model.state_dict()
    assert state and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not torch.equal(state["visual_projection.weight"], torch.zeros_like(state["visual_projection.weight"]))
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


def test_a_folder_missing_part_of_the_weights_is_refused_not_randomly_filled(clip_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from linewatch.models.clip import ClipScorer, ClipWeightsError

    path, state = clip_dir
    half = tmp_path / "half"
    shutil.copytree(path, half)
    save_file({k: v for k, v in state.items() if not k.startswith("text_model.")}, str(half / "model.safetensors"))
    with pytest.raises(ClipWeightsError, match="does not hold the whole model.*missing_keys"):
        ClipScorer.from_folder(half)
    with pytest.raises(EngineUnavailable, match="does not hold the whole model"):
        create_engine(ClipCfg(weights=half))
    assert ClipScorer.from_folder(path).version.startswith(f"clip-{path.name}-")  # names its weights


def test_a_folder_without_its_tokenizer_or_with_a_truncated_copy_is_refused(clip_dir, tmp_path):
    """Regression: without tokenizer files transformers built a tokenizer with an empty vocabulary,
    so every prompt had the same embedding, every map was 0.5 and every part passed; a truncated
    model.safetensors raised past the engine (a traceback instead of one line)."""
    import shutil

    path, _ = clip_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(path / name, bare / name)
    with pytest.raises(EngineUnavailable, match="has no tokenizer"):
        create_engine(ClipCfg(weights=bare))
    cut = tmp_path / "cut"
    shutil.copytree(path, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineUnavailable, match="cannot load CLIP weights"):
        create_engine(ClipCfg(weights=cut))
