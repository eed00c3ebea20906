"""DQFormer on real magnetic_tile images: a few training steps lower the loss, the checkpoint
loads into the inference helper, and the training run resumes from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MT = DATA / "magnetic_tile"

pytestmark = pytest.mark.skipif(not MT.is_dir(), reason=f"magnetic_tile data not found at {MT}")


@pytest.fixture(scope="module")
def small_doc() -> dict:
    from linewatch.refer import data as rdata

    doc = rdata.build_magnetic_tile(MT, seed=0, test_fraction=0.2, n_free=4)
    train = [s for s in doc["samples"] if s["split"] == "train"]
    test = [s for s in doc["samples"] if s["split"] == "test"]
    pick = ([s for s in train if s["kind"] == "blowhole"][:3] + [s for s in train if s["kind"] == "uneven"][:3]
            + [s for s in train if s["kind"] == "good"][:2])
    pick += [s for s in test if s["kind"] == "blowhole"][:2] + [s for s in test if s["kind"] == "good"][:1]
    return {**doc, "samples": pick}


def test_builder_covers_every_kind_with_a_fixed_split():
    from linewatch.refer import data as rdata

    a = rdata.build_magnetic_tile(MT, seed=0)
    b = rdata.build_magnetic_tile(MT, seed=0)
    assert [(s["image"], s["split"]) for s in a["samples"]] == [(s["image"], s["split"]) for s in b["samples"]]
    kinds = {s["kind"] for s in a["samples"]}
    assert kinds == {"blowhole", "break", "crack", "fray", "uneven", "good"}
    for s in a["samples"]:
        assert (s["mask"] is None) == (s["kind"] == "good")
        assert Path(s["image"]).is_file()
    test_share = np.mean([s["split"] == "test" for s in a["samples"]])
    assert 0.15 < test_share < 0.25
    # the four uneven images whose masks are empty are left out (a defect sentence with an empty
    # target would teach the kind to mean nothing); every other image keeps its split
    names = {Path(s["image"]).name for s in a["samples"]}
    empty = {"exp4_num_45057.jpg", "exp4_num_352527.jpg", "exp3_num_45042.jpg", "exp4_num_124690.jpg"}
    assert not names & empty
    assert sum(1 for s in a["samples"] if s["kind"] != "good") == len(list(MT.glob("*/*_mask.png"))) - 4


def test_few_steps_lower_the_loss_and_checkpoint_serves_predictions(small_doc, tmp_path):
    from linewatch.models.dqformer import DQFormerConfig
    from linewatch.refer import ReferringSegmenter
    from linewatch.refer.train import train

    torch.set_num_threads(1)
    cfg = DQFormerConfig(image_hw=(128, 128), dim=32, decoder_layers=2, freeze="all")
    res = train(small_doc, tmp_path, epochs=30, config=cfg, batch_size=8, lr=2e-3, seed=0,
                universal_prob=0.0, negative_prob=0.0, progress=False)
    losses = res["losses"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    ev = res["eval"]
    assert {"kind", "universal", "good"} <= set(ev) and ev["kind"]["n"] == 2

    seg = ReferringSegmenter.from_checkpoint(tmp_path / "last.pt")
    img = np.zeros((300, 200), np.uint8)  # any size, grey: mask comes back in its grid
    mask = seg.predict(img, "a blowhole on the magnetic tile")
    assert mask.shape == (300, 200) and mask.dtype == bool
    pred = seg.predict_batch([img, np.zeros((50, 60, 3), np.uint8)], ["any defect", "a crack"])
    assert pred[1].mask.shape == (50, 60) and 0.0 <= pred[1].score <= 1.0

    # resume: continues from the saved epoch instead of starting over
    res2 = train(small_doc, tmp_path, epochs=32, config=cfg, batch_size=8, lr=2e-3, seed=0,
                 universal_prob=0.0, negative_prob=0.0, progress=False, resume=True)
    assert [h["epoch"] for h in res2["history"]][-3:] == [30, 31, 32]
    assert len(res2["losses"]) == 2

    # regression: a resume on another split trained on images the checkpoint did not list
    other = {**small_doc, "seed": (small_doc.get("seed") or 0) + 1}
    with pytest.raises(ValueError, match="split seed"):
        train(other, tmp_path, epochs=33, config=cfg, batch_size=8, progress=False, resume=True)
    moved = {**small_doc, "samples": [{**smp, "split": "train"} for smp in small_doc["samples"]]}
    with pytest.raises(ValueError, match="another training split"):
        train(moved, tmp_path, epochs=33, config=cfg, batch_size=8, progress=False, resume=True)


def test_training_commands_refuse_what_would_leave_an_untrained_or_unevaluated_model(tmp_path, capsys):
    """Zero epochs and a resume with nothing to resume are one-line errors, not a fresh model."""
    from linewatch.cli import main

    assert main(["train", "dqformer", "--data", "magnetic_tile", "--out", str(tmp_path / "a"), "--epochs", "0"]) == 1
    assert "epochs must be at least 1" in capsys.readouterr().err
    assert main(["train", "dqformer", "--data", "magnetic_tile", "--out", str(tmp_path / "b"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and "Traceback" not in err
