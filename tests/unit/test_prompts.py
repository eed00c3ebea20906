"""IAP-AS: image tags measured with numpy, template composition, size filter and region score."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from linewatch.config import Config, PromptConfig, RecipePrompts
from linewatch.prompts import PromptTemplateError, check_template, compose, measure_tags, score_regions


def test_tags_follow_what_the_image_shows():
    flat_dark = np.full((64, 64), 20, np.uint8)
    t = measure_tags(flat_dark)
    assert (t.brightness, t.texture, t.orientation) == ("dark", "smooth", "uniform")
    assert measure_tags(np.full((64, 64, 3), 230, np.uint8)).brightness == "bright"

    stripes = np.zeros((64, 64), np.uint8)
    stripes[::4] = 200  # horizontal lines: gradients run vertically
    th = measure_tags(stripes)
    assert th.orientation == "horizontal" and th.texture == "rough"
    assert measure_tags(stripes.T).orientation == "vertical"

    noise = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    tn = measure_tags(noise)
    assert tn.orientation == "uniform" and tn.contrast == "high contrast" and tn.texture == "rough"


def test_compose_fills_tags_and_drops_empty_words():
    tags = measure_tags(np.full((32, 32), 20, np.uint8))
    out = compose(["{defect} on the {brightness} {texture} {material} {product}", "{defect}"],
                  ["a crack", "any defect"], "magnetic tile", "", tags)
    assert out == ["a crack on the dark smooth magnetic tile", "any defect on the dark smooth magnetic tile",
                   "a crack", "any defect"]
    assert compose(["{defect} on the {brightness} {product}"], ["a crack"], "tile") == ["a crack on the tile"]


def test_bad_templates_are_refused_with_the_placeholder_named():
    with pytest.raises(PromptTemplateError, match="colour"):
        check_template("{defect} on the {colour} part")
    with pytest.raises(ValidationError, match="unknown placeholder"):
        Config.model_validate({"engine": {"kind": "dqformer", "prompts": {"templates": ["{oops}"]}}})
    with pytest.raises(ValidationError, match="min_region_fraction"):
        PromptConfig(min_region_fraction=0.6, max_region_fraction=0.5)


def test_recipe_overrides_only_the_keys_it_sets():
    base = PromptConfig(product="part", material="steel", defects=["any defect"])
    got = RecipePrompts(product="magnetic tile").apply(base)
    assert (got.product, got.material, got.defects) == ("magnetic tile", "steel", ["any defect"])


def test_size_filter_and_score_is_sum_of_confidence_times_mask_share():
    mask = np.zeros((100, 100), bool)
    prob = np.zeros((100, 100), np.float32)
    mask[10:20, 10:20] = True  # 100 px = 1 % of the image
    prob[10:20, 10:20] = 0.9
    mask[50:80, 50:80] = True  # 900 px = 9 %
    prob[50:80, 50:80] = 0.6
    mask[0, 99] = True  # 1 px: below the size threshold
    prob[0, 99] = 1.0
    rs = score_regions(mask, prob, min_region_fraction=0.005)
    assert rs.dropped == 1 and not rs.mask[0, 99] and rs.mask[15, 15]
    assert [r.area_px for r in rs.regions] == [900, 100]
    assert rs.shares == pytest.approx([0.9, 0.1])
    assert rs.score == pytest.approx(0.6 * 0.9 + 0.9 * 0.1)
    assert rs.regions[1].bbox == (10, 10, 20, 20)
    # an over-large region (a flooded mask) is a misfire, dropped by max_region_fraction
    assert score_regions(mask, prob, 0.005, max_region_fraction=0.05).shares == [1.0]
    empty = score_regions(np.zeros((8, 8), bool), np.zeros((8, 8), np.float32), 0.01)
    assert empty.score == 0.0 and empty.regions == [] and not empty.mask.any()


@pytest.mark.parametrize("template, why", [
    ("{defect:d} on the {product}", "format spec"),
    ("{defect!x} on the {product}", "format spec"),
    ("{product:{texture}} with {defect}", "format spec"),
    ("{orientation} {material}", "can come out empty"),
])
def test_templates_that_would_fail_or_vanish_on_a_frame_are_refused(template, why):
    """Refused with the config, not on every frame: a format spec raises in compose(), and a
    template of tags only renders empty on a plain frame (no sentence: the batch faulted)."""
    with pytest.raises(PromptTemplateError, match=why):
        check_template(template)
    with pytest.raises(ValidationError, match=why):
        Config.model_validate({"engine": {"kind": "dqformer", "prompts": {"templates": [template]}}})
    assert check_template("{defect}") == "{defect}"
    with pytest.raises(ValidationError, match="can come out empty"):  # CLIP's normal prompts have no defect
        Config.model_validate({"engine": {"kind": "clip", "normal_templates": ["{texture} {product}"]}})
    with pytest.raises(ValidationError, match="blank"):
        PromptConfig(defects=["a crack", " "])


def test_a_recipe_override_is_checked_with_the_config():
    """An override that makes its recipe's prompt settings invalid is a config error naming the
    recipe (it used to pass check-config and fault every batch of that recipe's frames)."""
    for kind in ("dqformer", "clip"):
        with pytest.raises(ValidationError, match="recipes.tile_a"):
            Config.model_validate({"engine": {"kind": kind, "recipes": {"tile_a": {"min_region_fraction": 0.9}}}})
        with pytest.raises(ValidationError, match="recipes.tile_a.*colour"):
            Config.model_validate({"engine": {"kind": kind, "recipes": {
                "tile_a": {"templates": ["{defect} on the {colour} {product}"]}}}})
    cfg = Config.model_validate({"engine": {"kind": "dqformer", "recipes": {"tile_a": {"product": "tile"}}}})
    assert cfg.engine.recipes["tile_a"].product == "tile"


def test_tags_of_16_bit_and_strip_frames():
    dark = np.full((64, 64), 40, np.uint8)
    assert measure_tags(dark.astype(np.uint16) * 257).brightness == measure_tags(dark).brightness == "dark"
    strip = np.random.default_rng(0).integers(0, 255, (2, 4096), np.uint8)  # a line-scan strip
    assert measure_tags(strip).contrast == "high contrast"
