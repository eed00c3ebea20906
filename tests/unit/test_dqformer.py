"""Unit tests for DQFormer: shapes, the two-query argmax mask, the LMA gate, that language
changes the output, the loss, checkpoints, and the referring data helpers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from linewatch.models.dqformer import (ANOMALY, DQFormer, DQFormerConfig, anomaly_probability,
                                       dqformer_loss, load_checkpoint, predict_mask, save_checkpoint)
from linewatch.refer import data as rdata
from linewatch.metrics import segmentation_metrics
from linewatch.refer.evaluate import summarize, wrong_sentence
from linewatch.refer.train import parse_hw

H = W = 64  # small input: strides 4..32 give 16, 8, 4, 2 cells


def _text(n: int, t: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(n, t, 384, generator=g)
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[:, t // 2:] = False  # padded tail
    sent = torch.nn.functional.normalize(torch.randn(n, 384, generator=g), dim=1)
    return words, mask, sent


@pytest.fixture(scope="module")
def model() -> DQFormer:
    torch.manual_seed(0)
    cfg = DQFormerConfig(image_hw=(H, W), dim=32, heads=4, decoder_layers=2, max_tokens=8,
                         pretrained=False, freeze="all")
    return DQFormer(cfg).eval()


def test_forward_shapes_and_argmax_mask(model):
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        logits = model(x, *_text(2))
    assert logits.shape == (2, 2, H // 4, W // 4)
    mask = predict_mask(logits)
    assert mask.dtype == torch.bool and mask.shape == (2, H // 4, W // 4)
    assert torch.equal(mask, logits[:, ANOMALY] > logits[:, 1 - ANOMALY])
    prob = anomaly_probability(logits)
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0
    assert torch.equal(prob > 0.5, mask)


def test_gates_are_in_unit_interval(model):
    model(torch.randn(2, 3, H, W), *_text(2))
    assert set(model.last_gates) == {"8", "16", "32"}
    for g in model.last_gates.values():
        assert g.shape == (2, model.config.dim)
        assert float(g.min()) >= 0.0 and float(g.max()) <= 1.0


def test_language_changes_the_output(model):
    x = torch.randn(1, 3, H, W).expand(2, -1, -1, -1)  # same image twice
    words, mask, sent = _text(2, seed=3)
    logits = model(x, words, mask, sent)
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    # and the same sentence on the same image gives the same logits
    same = model(x, words[:1].expand(2, -1, -1), mask[:1].expand(2, -1), sent[:1].expand(2, -1))
    assert torch.allclose(same[0], same[1], atol=1e-5)


def test_padded_words_are_ignored(model):
    x = torch.randn(1, 3, H, W)
    words, mask, sent = _text(1)
    a = model(x, words, mask, sent)
    words2 = words.clone()
    words2[:, ~mask[0]] = 100.0  # change only padded positions
    b = model(x, words2, mask, sent)
    assert torch.allclose(a, b, atol=1e-4)


def test_frozen_backbone_has_no_trainable_parameters(model):
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.set_freeze("stride8")
    try:
        assert any(p.requires_grad for p in model.backbone.levels["32"].parameters())
        assert not any(p.requires_grad for p in model.backbone.levels["8"].parameters())
    finally:
        model.set_freeze("all")


def test_loss_is_lower_for_the_right_answer():
    target = torch.zeros(1, 16, 16)
    target[0, 4:10, 4:10] = 1
    good = torch.stack([1 - target, target], 1) * 8 - 4  # confident and right
    bad = torch.stack([target, 1 - target], 1) * 8 - 4  # confident and wrong
    lg, parts = dqformer_loss(good, target)
    lb, _ = dqformer_loss(bad, target)
    assert float(lg) < 0.1 < float(lb)
    assert set(parts) == {"ce", "dice"}
    empty = torch.zeros(1, 16, 16)
    le, _ = dqformer_loss(torch.stack([torch.ones(16, 16), -torch.ones(16, 16)])[None] * 4, empty)
    assert torch.isfinite(le) and float(le) < 0.1


def test_checkpoint_round_trip(model, tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    from linewatch.models.text import TEXT_MODEL_NAME

    save_checkpoint(tmp_path / "other.pt", model, "text-model-x", {}, epoch=1)
    with pytest.raises(ValueError, match="trained with sentence encoder 'text-model-x'"):
        load_checkpoint(tmp_path / "other.pt")
    save_checkpoint(path, model, TEXT_MODEL_NAME, {"miou": 0.5}, epoch=3)
    loaded, blob = load_checkpoint(path)
    assert blob["text_model"] == TEXT_MODEL_NAME and blob["epoch"] == 3
    assert blob["metrics"] == {"miou": 0.5}
    assert loaded.config.image_hw == model.config.image_hw and loaded.config.dim == model.config.dim
    x = torch.randn(1, 3, H, W)
    t = _text(1)
    assert torch.allclose(model(x, *t), loaded(x, *t), atol=1e-6)


def test_checkpoint_of_wrong_format_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": "something-else"}, path)
    with pytest.raises(ValueError, match="not a DQFormer checkpoint"):
        load_checkpoint(path)


def test_config_rejects_bad_sizes_and_freeze():
    with pytest.raises(ValueError, match="multiples of 32"):
        DQFormerConfig(image_hw=(100, 96), pretrained=False)
    with pytest.raises(ValueError, match="freeze"):
        DQFormerConfig(freeze="half", pretrained=False)
    assert DQFormerConfig.from_dict(DQFormerConfig(image_hw=(64, 96)).to_dict()).image_hw == (64, 96)


def test_parse_hw():
    assert parse_hw("256") == (256, 256)
    assert parse_hw("192x512") == (192, 512)
    with pytest.raises(Exception, match="multiples of 32"):
        parse_hw("100")


def test_metrics_summary():
    s = summarize([(5, 10), (9, 10), (0, 0)])  # IoU 0.5, 0.9, 1.0 (both empty)
    assert s["miou"] == pytest.approx(0.8)
    assert s["oiou"] == pytest.approx(14 / 20)
    assert s["prec@0.5"] == pytest.approx(1.0)  # IoU >= 0.5, as linewatch.metrics counts it
    assert s["prec@0.9"] == pytest.approx(2 / 3)
    masks = [(np.arange(10) < 5, np.arange(10) < 10), (np.arange(10) < 9, np.arange(10) < 10)]
    m = segmentation_metrics([p for p, _ in masks], [g for _, g in masks])
    assert summarize([(5, 10), (9, 10)]) == {"n": 2, **m}  # one definition of the figures


def test_wrong_sentence_never_names_a_kind_in_the_image():
    kinds = {"crack": ["a crack"], "blowhole": ["a blowhole"], "fray": ["a fray"]}
    assert wrong_sentence("blowhole", kinds, present=("blowhole", "crack")) == "a fray"
    assert wrong_sentence("blowhole", kinds, present=("blowhole", "crack", "fray")) is None


def test_the_universal_prompt_is_trained_only_on_a_whole_defect_area():
    """A frame with a crack and a fray gives a crack sample whose mask holds the crack only:
    "any defect" on it would teach the model to miss the fray (its "mixed" sample, with the whole
    mask, teaches the universal prompt)."""
    part = rdata.ReferItem(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), bool), ["a crack"], "crack", "x",
                           present=("crack", "fray"))
    rng = random.Random(0)
    kinds = {"crack": ["a crack"], "fray": ["a fray"], "spot": ["a spot"]}
    picks = [rdata.pick_sentence(part, rng, kinds, ["any defect"], 0.5, 0.2) for _ in range(4000)]
    assert not any(s == "any defect" for s, _ in picks)
    # the universal share goes to its own sentence, not to more negatives (empty targets)
    share = {s: sum(p[0] == s for p in picks) / len(picks) for s in ("a crack", "a spot")}
    assert share["a spot"] == pytest.approx(0.2, abs=0.03) and share["a crack"] == pytest.approx(0.8, abs=0.03)
    assert not part.whole and rdata.ReferItem(part.image, part.mask, ["a crack"], "crack", "x", ("crack",)).whole


def test_wrong_sentence_picks_another_kind():
    kinds = {"crack": ["a crack"], "blowhole": ["a blowhole"], "fray": ["a fray"]}
    assert wrong_sentence("blowhole", kinds) == "a crack"
    assert wrong_sentence("fray", kinds) == "a blowhole"
    assert wrong_sentence("crack", {"crack": ["a crack"]}) is None


def test_spatial_sentences_follow_the_mask():
    mask = np.zeros((90, 90), bool)
    mask[5:10, 72:82] = True  # 50 px of 8100: "small"
    sents = rdata.spatial_sentences("a blowhole", "tile", mask)
    assert sents[0] == "a blowhole in the top right area of the tile"
    assert "small blowhole" in sents[1]
    assert rdata.spatial_sentences("a crack", "tile", np.zeros((4, 4), bool)) == []


def test_pick_sentence_mixes_universal_and_negatives():
    item = rdata.ReferItem(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), bool), ["a crack"], "crack", "x")
    kinds = {"crack": ["a crack"], "fray": ["a fray"]}
    rng = random.Random(0)
    picks = [rdata.pick_sentence(item, rng, kinds, ["any defect"], 0.3, 0.2) for _ in range(2000)]
    share = {s: sum(p[0] == s for p in picks) / len(picks) for s in ("a crack", "any defect", "a fray")}
    assert share["any defect"] == pytest.approx(0.3, abs=0.05)
    assert share["a fray"] == pytest.approx(0.2, abs=0.05)
    assert all(keep is False for s, keep in picks if s == "a fray")
    assert all(keep is True for s, keep in picks if s != "a fray")


def test_negative_sentences_never_name_a_kind_present_in_the_image():
    """A frame with a crack and a fray gives a crack sample: "a fray" must not be its negative
    (an emptied target would teach the model to ignore the fray that is there)."""
    item = rdata.ReferItem(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), bool), ["a crack"], "crack", "x",
                           present=("crack", "fray"))
    kinds = {"crack": ["a crack"], "fray": ["a fray"], "spot": ["a spot"]}
    rng = random.Random(0)
    picks = [rdata.pick_sentence(item, rng, kinds, ["any defect"], 0.3, 0.3) for _ in range(1000)]
    assert not any(s == "a fray" for s, _ in picks)
    assert any(s == "a spot" and keep is False for s, keep in picks)


def test_load_validates_and_resolves_relative_paths(tmp_path):
    doc = {"format": rdata.FORMAT, "samples": [
        {"image": "img/a.png", "mask": None, "sentences": ["any defect"], "kind": "good", "split": "train"}]}
    p = tmp_path / "d.json"
    p.write_text(json.dumps(doc))
    out = rdata.load(p)
    assert out["samples"][0]["image"] == str(tmp_path / "img" / "a.png")
    doc["samples"][0]["split"] = "val"
    p.write_text(json.dumps(doc))
    with pytest.raises(rdata.ReferDataError, match=r"samples\[0\]\.split"):
        rdata.load(p)


def test_exports_to_onnx_with_matching_outputs(model, tmp_path):
    """Guards against text encoding or Python control flow creeping into forward()."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    x = torch.randn(1, 3, H, W)
    words, mask, sent = _text(1)
    path = tmp_path / "dq.onnx"
    torch.onnx.export(model, (x, words, mask, sent), str(path), dynamo=False, opset_version=17,
                      input_names=["image", "words", "word_mask", "sentence"], output_names=["logits"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": x.numpy(), "words": words.numpy(), "word_mask": mask.numpy(),
                          "sentence": sent.numpy()})[0]
    with torch.no_grad():
        ref = model(x, words, mask, sent).numpy()
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < 1e-4


def test_a_mirrored_training_image_gets_a_mirrored_sentence():
    """Regression: training mirrored the image and the mask at random but kept the sentence, so
    "a crack in the top left area" was taught on a target at the top right."""
    from linewatch.refer.train import flip_sentence

    s = "a small blowhole in the top left area of the tile"
    assert flip_sentence(s, False, False) == s
    assert flip_sentence(s, True, False) == "a small blowhole in the top right area of the tile"
    assert flip_sentence(s, False, True) == "a small blowhole in the bottom left area of the tile"
    assert flip_sentence(s, True, True) == "a small blowhole in the bottom right area of the tile"
    assert flip_sentence("Left edge, upper part; a bright spot", True, True) == "Right edge, lower part; a bright spot"
    assert flip_sentence("a stopper on the leftover", True, True) == "a stopper on the leftover"  # whole words only
