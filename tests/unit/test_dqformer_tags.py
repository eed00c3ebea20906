"""Training-time image-aware sentences (--tag-prob): same defect phrase, tags of the image."""

from __future__ import annotations

import random

import numpy as np

from linewatch.prompts import measure_tags
from linewatch.refer.train import TAG_TEMPLATES, with_tags
from linewatch.prompts import check_template


def test_with_tags_keeps_the_phrase_and_adds_measured_words():
    tags = measure_tags(np.full((64, 64), 15, np.uint8))  # dark, smooth, uniform
    rng = random.Random(0)
    outs = {with_tags("a crack on the magnetic tile surface", tags, "magnetic tile", rng) for _ in range(40)}
    assert all(o.startswith("a crack on the ") and o.endswith(" magnetic tile") for o in outs)
    assert any("dark" in o for o in outs) and any("smooth" in o for o in outs)
    assert all("  " not in o and "uniform" not in o for o in outs)
    spatial = "a small crack in the top left area"
    assert with_tags(spatial, tags, "magnetic tile", rng) == spatial
    for t in TAG_TEMPLATES:
        check_template(t)
