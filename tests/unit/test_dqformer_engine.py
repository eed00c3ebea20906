"""DQFormer engine logic with a recording fake segmenter: prompts per recipe and per image, mask
passed through (no threshold), size filter, Score = sum s_i * m_i, missing checkpoint refused."""

from __future__ import annotations

import numpy as np
import pytest

from linewatch.config import Config, DQFormerEngine as DQCfg, ThresholdConfig
from linewatch.decision import Threshold
from linewatch.engines import EngineUnavailable, create_engine
from linewatch.engines.dqformer import DQFormerEngine
from linewatch.frames import FrameMeta, Verdict
from linewatch.inspector import decide
from linewatch.refer.predict import Prediction


class FakeSegmenter:
    """Returns a fixed square blob (prob 0.8) plus one stray pixel (prob 0.9) for every sentence
    containing 'crack', nothing otherwise; records the (shape, sentence) pairs it was asked."""

    version = "fake-1"

    def __init__(self):
        self.calls: list[tuple[tuple[int, ...], str]] = []

    def predict_batch(self, images, sentences):
        out = []
        for im, s in zip(images, sentences):
            self.calls.append((im.shape, s))
            h, w = im.shape[:2]
            prob = np.full((h, w), 0.1, np.float32)
            if "crack" in s:
                prob[h // 4:h // 2, w // 4:w // 2] = 0.8
                prob[0, w - 1] = 0.9
            out.append(Prediction(prob > 0.5, prob))
        return out


def _meta(h, w, recipe="default"):
    return FrameMeta(frame_id=7, t_capture=0.0, camera="c", height=h, width=w, recipe=recipe)


def _cfg(**engine):
    return Config.model_validate({"engine": {"kind": "dqformer", **engine}}).engine


def test_prompts_come_from_recipe_and_image_and_mask_is_final():
    cfg = _cfg(prompts={"product": "part", "defects": ["any defect"],
                        "templates": ["{defect} on the {brightness} {product}"],
                        "min_region_fraction": 0.001},
               recipes={"tile": {"product": "magnetic tile", "defects": ["a crack", "a thin crack"]}})
    seg = FakeSegmenter()
    eng = DQFormerEngine(cfg, segmenter=seg)
    dark = np.full((80, 120, 1), 15, np.uint8)
    outs = eng.infer([dark, dark], [_meta(80, 120, "tile"), _meta(80, 120)])
    assert [s for _, s in seg.calls] == ["a crack on the dark magnetic tile", "a thin crack on the dark magnetic tile",
                                         "any defect on the dark part"]
    tile, default = outs
    # two crack sentences averaged; the 1-pixel blob is below 0.1 % of the frame and dropped
    assert tile.mask is not None and tile.mask.sum() == 20 * 30 and not tile.mask[0, 119]
    assert len(tile.regions) == 1 and tile.regions[0].bbox == (30, 20, 60, 40)
    assert tile.image_score == pytest.approx(0.8)  # one region: s = 0.8, m = 1
    assert tile.score_map.shape == (80, 120)
    assert default.mask is not None and not default.mask.any()
    assert default.image_score == pytest.approx(0.05)  # no region: half the highest probability (0.1)

    thr = Threshold(ThresholdConfig())  # uncalibrated: a thresholded engine would be NOT_INSPECTED
    assert thr.current() is None
    assert decide(tile, _meta(80, 120), thr, 16, {"name": "dqformer", "version": "x"}).verdict is Verdict.NG
    assert decide(default, _meta(80, 120), thr, 16, {"name": "dqformer", "version": "x"}).verdict is Verdict.OK


def test_image_tags_can_be_switched_off():
    eng = DQFormerEngine(_cfg(prompts={"image_tags": False, "templates": ["{defect} on the {brightness} {product}"]}),
                         segmenter=FakeSegmenter())
    assert eng.sentences(np.zeros((16, 16, 3), np.uint8), "x") == ["any defect on the part"]


def test_missing_checkpoint_is_a_one_line_startup_error(tmp_path):
    cfg = DQCfg(checkpoint=tmp_path / "missing.pt")
    with pytest.raises(EngineUnavailable) as err:
        create_engine(cfg)
    msg = str(err.value)
    assert "missing.pt" in msg and "\n" not in msg


def test_check_config_names_the_missing_checkpoint(tmp_path, capsys):
    from linewatch.cli import main

    p = tmp_path / "c.toml"
    p.write_text(f'[engine]\nkind = "dqformer"\ncheckpoint = "{tmp_path / "nope.pt"}"\n')
    assert main(["check-config", str(p)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "engine.checkpoint" in err[0] and "nope.pt" in err[0]


def test_documented_alternative_engine_blocks_parse_when_uncommented(tmp_path):
    """Guards against a config.toml example that a line engineer cannot use as written."""
    from linewatch.configdoc import render_default

    text = render_default()
    for kind in ("dqformer", "clip"):
        start = text.index(f"# Alternative: the {kind}")
        block = text[start:text.index("\n\n", start)].splitlines()
        keep = [ln for ln in block if (ln.startswith("# [") and ln.endswith("]")) or " = " in ln]
        body = "\n".join(ln[2:] for ln in keep)
        ckpt = tmp_path / "last.pt"
        ckpt.write_bytes(b"")
        body = body.replace('"var/dqformer/mt256_tags/last.pt"', f'"{ckpt}"')
        eng = Config.model_validate(__import__("tomllib").loads(body)).engine
        assert eng.kind == kind
        if kind == "dqformer":
            assert eng.recipes["tile_a"].apply(eng.prompts).product == "magnetic tile"


def test_every_registered_engine_has_a_config_model_and_back():
    """Guards against an engine kind that the registry knows but config.toml cannot select."""
    import typing

    from linewatch.config import EngineConfig
    from linewatch.engines import ENGINES

    union = typing.get_args(typing.get_args(EngineConfig)[0])
    kinds = {typing.get_args(m.model_fields["kind"].annotation)[0] for m in union}
    assert kinds == set(ENGINES)
    for kind in ENGINES:
        assert Config.model_validate({"engine": {"kind": kind}}).engine.kind == kind


def test_a_flooded_frame_is_ng_with_its_oversized_region_never_ok():
    """A mask over most of the frame (a covered lens, glare, a huge defect) is not a plausible
    defect, but dropping it would publish OK."""
    class Flood(FakeSegmenter):
        def predict_batch(self, images, sentences):
            h, w = images[0].shape[:2]
            prob = np.full((h, w), 0.9, np.float32)
            prob[:, : w // 4] = 0.1  # 75 % of the frame marked
            return [Prediction(prob > 0.5, prob) for _ in images]

    eng = DQFormerEngine(_cfg(prompts={"defects": ["a crack"], "max_region_fraction": 0.5}), segmenter=Flood())
    (out,) = eng.infer([np.zeros((40, 40, 1), np.uint8)], [_meta(40, 40)])
    assert [r.label for r in out.regions] == ["oversized a crack"] and out.regions[0].area_px == 40 * 30
    assert out.image_score == pytest.approx(0.9) and out.mask.sum() == 40 * 30
    r = decide(out, _meta(40, 40), Threshold(ThresholdConfig()), 16, {"name": "dqformer", "version": "x"})
    assert r.verdict is Verdict.NG


def test_image_tags_are_measured_at_the_models_input_size_as_in_training():
    from types import SimpleNamespace

    from linewatch.models.backbone import resize_uint8
    from linewatch.prompts import measure_tags

    seg = FakeSegmenter()
    seg.config = SimpleNamespace(image_hw=(32, 32))  # what ReferringSegmenter exposes
    eng = DQFormerEngine(_cfg(prompts={"defects": ["a crack"], "templates": ["{defect} on the {brightness} {product}"]}),
                         segmenter=seg)
    stripes = np.zeros((256, 256, 1), np.uint8)
    stripes[::2] = 255  # 1-px stripes: read differently at full size and at 32 x 32
    small, full = measure_tags(resize_uint8(stripes, 32, 32)), measure_tags(stripes)
    assert small.brightness != full.brightness
    (sentence,) = eng.sentences(stripes, "default")
    assert f" {small.brightness} " in sentence


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", "list"])
def test_a_checkpoint_that_is_not_one_is_refused_as_unavailable(tmp_path, content):
    import torch

    path = tmp_path / "bad.pt"
    if content == "list":
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(EngineUnavailable, match="cannot load DQFormer checkpoint"):
        create_engine(DQCfg(checkpoint=path))
