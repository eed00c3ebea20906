"""Evaluation of a referring segmenter on a held-out split.

For every defective test image three sentences are run: its own kind-specific sentence (the
first of its list), the universal prompt ("any defect"), and a wrong-kind sentence (the first
sentence of the next kind in sorted order that is not in the image). The universal prompt is
scored on the samples whose mask is the image's whole defect area (a synthetic frame with two
kinds has a sample per kind, each with its kind's share, and a "mixed" sample with all of it);
the kind sentence on the samples of one kind (not "mixed"). Reported, each at the model's input
size:

- ``miou``: mean per-image IoU; ``oiou``: overall IoU (sum of intersections / sum of unions);
- ``prec@0.5/0.7/0.9``: share of images whose IoU reaches the threshold (IoU >= t, as
  ``linewatch.metrics``);
- ``wrong_kind``: the same with the wrong-kind sentence, and ``iou_drop`` = miou(kind) -
  miou(wrong); a model that ignores language has a drop near 0;
- on defect-free test images with the universal prompt: ``good_fp_rate`` (share with any
  predicted pixel) and ``good_area`` (mean predicted area share).

``linewatch train eval --ckpt <file> --data <json|name> [--figure out.png]`` (or
``python -m linewatch.refer.evaluate ...``) prints these as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..datasets import image_key
from ..metrics import iou_summary
from ..models.backbone import preprocess
from ..models.dqformer import ANOMALY, DQFormer
from ..models.text import TextEncoder
from . import data as rdata

logger = logging.getLogger(__name__)

PREC_THRESHOLDS = (0.5, 0.7, 0.9)


def iou_stats(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts of two bool masks."""
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def summarize(pairs: list[tuple[int, int]]) -> dict[str, float]:
    """mIoU, overall IoU and precision@k from (intersection, union) pairs (union 0 -> IoU 1), as
    ``linewatch.metrics`` computes them, with the count ``n``."""
    if not pairs:
        return {"n": 0}
    return {"n": len(pairs), **iou_summary(pairs, PREC_THRESHOLDS)}


def wrong_sentence(kind: str, kinds: dict[str, list[str]], present: tuple[str, ...] = ()) -> str | None:
    """First sentence of the next kind after ``kind`` in sorted order that is not among the
    image's ``present`` kinds (None when there is none)."""
    names = sorted(k for k in kinds if kinds[k])
    if kind not in names:
        return None
    at = names.index(kind)
    for step in range(1, len(names)):
        other = names[(at + step) % len(names)]
        if other not in present:
            return kinds[other][0]
    return None


@torch.no_grad()
def predict_masks(model: DQFormer, text: TextEncoder, images: list[np.ndarray],
                  sentences: list[str], device: torch.device, batch_size: int = 16) -> list[np.ndarray]:
    """Masks (bool, at the images' size, which must be the model's image_hw) for image/sentence pairs.
    ``model`` may also be a checkpoint's export on another backend (``predict.ExportedModel``)."""
    model.eval()
    out: list[np.ndarray] = []
    for a in range(0, len(images), batch_size):
        x = preprocess(np.stack(images[a:a + batch_size])).to(device)
        enc = text.encode(sentences[a:a + batch_size]).to(device)
        logits = model(x, enc.tokens, enc.mask, enc.pooled)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out.extend((logits.argmax(1) == ANOMALY).cpu().numpy())
    return out


def evaluate(model: DQFormer, text: TextEncoder, items: list[rdata.ReferItem],
             kinds: dict[str, list[str]], device: str | torch.device = "cpu",
             universal_prompt: str = rdata.UNIVERSAL_EVAL_PROMPT, batch_size: int = 16) -> dict:
    """All metrics of the module docstring for loaded test ``items``."""
    device = torch.device(device)
    bad = [it for it in items if it.kind != "good" and it.mask.any()]
    good = [it for it in items if it.kind == "good" or not it.mask.any()]
    res: dict = {}
    whole = [it for it in bad if it.whole]
    if whole:
        uni_pred = predict_masks(model, text, [it.image for it in whole], [universal_prompt] * len(whole), device,
                                 batch_size)
        res["universal"] = summarize([iou_stats(p, it.mask) for p, it in zip(uni_pred, whole)])
    bad = [it for it in bad if it.kind != "mixed"]  # a mixed sample's own sentence is the universal prompt
    if bad:
        kind_pred = predict_masks(model, text, [it.image for it in bad], [it.sentences[0] for it in bad], device,
                                  batch_size)
        k_pairs = [iou_stats(p, it.mask) for p, it in zip(kind_pred, bad)]
        res["kind"] = summarize(k_pairs)
        res["per_kind"] = {k: summarize([pr for pr, it in zip(k_pairs, bad) if it.kind == k])["miou"]
                           for k in sorted({it.kind for it in bad})}
        wrong = [(i, wrong_sentence(it.kind, kinds, it.present)) for i, it in enumerate(bad)]
        wrong = [(i, s) for i, s in wrong if s]
        if wrong:
            w_pred = predict_masks(model, text, [bad[i].image for i, _ in wrong], [s for _, s in wrong],
                                   device, batch_size)
            w = summarize([iou_stats(p, bad[i].mask) for p, (i, _) in zip(w_pred, wrong)])
            right = np.mean([k_pairs[i][0] / k_pairs[i][1] if k_pairs[i][1] else 1.0 for i, _ in wrong])
            w["iou_drop"] = float(right - w["miou"])
            w["pred_area"] = float(np.mean([p.mean() for p in w_pred]))
            res["wrong_kind"] = w
    if good:
        g_pred = predict_masks(model, text, [it.image for it in good], [universal_prompt] * len(good),
                               device, batch_size)
        res["good"] = {"n": len(good), "good_fp_rate": float(np.mean([p.any() for p in g_pred])),
                       "good_area": float(np.mean([p.mean() for p in g_pred]))}
    return res


def evaluate_iap(model: DQFormer, text: TextEncoder, items: list[rdata.ReferItem],
                 template: str, product: str, device: str | torch.device = "cpu",
                 universal_prompt: str = rdata.UNIVERSAL_EVAL_PROMPT, batch_size: int = 16) -> dict:
    """mIoU etc. when each sentence is composed by an image-aware prompt template (IAP-AS): the
    kind's first sentence (or the universal prompt) is the ``{defect}``, the tags are measured
    from the image. Returns ``{"iap_kind": ..., "iap_universal": ..., "example": sentence}``."""
    from ..prompts import compose, measure_tags

    device = torch.device(device)
    bad = [it for it in items if it.kind != "good" and it.mask.any()]
    if not bad:
        return {}
    tags = [measure_tags(it.image) for it in bad]
    out: dict = {}
    for key, phrases in (("iap_kind", [it.sentences[0] for it in bad]),
                         ("iap_universal", [universal_prompt] * len(bad))):
        sents = [compose([template], [p], product, "", t)[0] for p, t in zip(phrases, tags)]
        pred = predict_masks(model, text, [it.image for it in bad], sents, device, batch_size)
        out[key] = summarize([iou_stats(p, it.mask) for p, it in zip(pred, bad)])
        out[key]["example"] = sents[0]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``linewatch eval dqformer``."""
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint file (last.pt)")
    parser.add_argument("--data", required=True,
                        help="referring JSON file, or a data set name under ../shared/data")
    parser.add_argument("--split", default="test", choices=rdata.SPLITS)
    parser.add_argument("--seed", type=int, default=None,
                        help="split seed when --data is a name (default: the seed the checkpoint was "
                             "trained with, so that its test split holds no training image)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"),
                        help="run the checkpoint as the daemon's [engine] backend does: onnxruntime and "
                             "tensorrt export it into --engines-dir first (and build a plan), so the "
                             "figures are those of the graph that is deployed")
    parser.add_argument("--engines-dir", type=Path, default=Path("engines"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json-out", type=Path, default=None, help="also write the metrics here")
    parser.add_argument("--iap-template", default=None,
                        help="also evaluate image-aware prompts from this template, e.g. "
                             "'{defect} on the {brightness} {texture} {product}'")
    parser.add_argument("--iap-product", default="magnetic tile", help="{product} for --iap-template")
    parser.add_argument("--figure", type=Path, default=None,
                        help="also draw own / wrong-kind / universal sentence masks to this PNG")


def run(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint and print the metrics as JSON; returns the exit code."""
    from ..models.dqformer import load_checkpoint

    model, blob = load_checkpoint(args.ckpt)
    backend = getattr(args, "backend", "torch")
    if backend == "torch":  # otherwise the export runs; the model gives its config
        model.to(args.device)
    # the split the checkpoint was trained on (older checkpoints: the training seed, which the
    # training command also uses for the split)
    trained_seed = int(blob.get("split_seed") if blob.get("split_seed") is not None else blob.get("seed", 0))
    seed = trained_seed if args.seed is None else args.seed
    # a data set given by name is built with that name (checked before building it)
    from_name = str(args.data) in rdata.BUILDERS and not Path(args.data).exists()
    if from_name and seed != trained_seed and str(args.data) == blob.get("data_name", ""):
        print(f"linewatch: {args.ckpt} was trained on the {args.data} split of seed {trained_seed}; "
              f"the split of seed {seed} would test it on images it was trained on", file=sys.stderr)
        return 2
    doc = rdata.load(args.data, seed=seed)
    items = rdata.load_items(doc, args.split, model.config.image_hw)
    if not items:
        raise rdata.ReferDataError(f"the {args.split} split of {args.data} is empty: nothing to evaluate")
    trained = blob.get("train_images")
    if trained is not None and args.split != "train":  # another seed or split settings than training's
        seen = {image_key(p) for p in trained}
        leaked = [it.path for it in items if image_key(it.path) in seen]
        if leaked:
            print(f"linewatch: {len(leaked)} of the {len(items)} {args.split} images of {args.data} are among "
                  f"the {len(seen)} images {args.ckpt} was trained on (e.g. {leaked[0]}): the figures would "
                  f"count training images; evaluate the split it was trained with", file=sys.stderr)
            return 2
    text = TextEncoder(max_tokens=model.config.max_tokens)
    net, device = model, args.device
    if backend != "torch":
        from ..config import DQFormerEngine
        from ..refer.predict import ExportedModel
        from ..runtime import create_dqformer_runner

        runner, _ = create_dqformer_runner(DQFormerEngine(checkpoint=args.ckpt, backend=backend, device=args.device,
                                                          engines_dir=args.engines_dir))
        net, device = ExportedModel(runner), "cpu"  # the backend places its own inputs
    metrics = evaluate(net, text, items, doc["kind_sentences"], device, batch_size=args.batch_size)
    metrics["backend"] = backend
    if getattr(args, "iap_template", None):
        metrics.update(evaluate_iap(net, text, items, args.iap_template, args.iap_product, device,
                                    batch_size=args.batch_size))
    out = json.dumps(metrics, indent=1)
    print(out)
    if args.json_out:
        args.json_out.write_text(out, encoding="utf-8")
    if getattr(args, "figure", None):
        from .figure import sentence_figure

        sentence_figure(net, text, items, doc["kind_sentences"], args.figure, metrics=metrics, device=device)
        print(f"figure: {args.figure}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m linewatch.refer.evaluate``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
