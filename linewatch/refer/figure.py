"""The "does the sentence matter" figure: held-out images segmented with their own kind's sentence,
a wrong kind's sentence and the universal prompt, side by side with the ground truth.

Written by ``python -m linewatch.refer.evaluate --ckpt ... --data ... --figure out.png``. Drawn with
PIL only (no plotting dependency): one row per image, predicted pixels in red over the grey image,
each panel titled with its sentence and IoU; the top line gives the split's mIoU per sentence kind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models.dqformer import DQFormer
from ..models.text import TextEncoder
from . import data as rdata
from .data import UNIVERSAL_EVAL_PROMPT
from .evaluate import iou_stats, predict_masks, wrong_sentence

PANEL_PX = 192
TITLE_PX = 34


def _overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 40, 40)) -> np.ndarray:
    grey = image.mean(axis=2, keepdims=True) if image.ndim == 3 else image[..., None]
    rgb = np.repeat(grey, 3, axis=2).astype(np.float32)
    rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(colour, np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    i, u = iou_stats(pred, gt)
    return i / u if u else 1.0


def sentence_figure(model: DQFormer, text: TextEncoder, items: list[rdata.ReferItem],
                    kinds: dict[str, list[str]], out_path: Path | str, per_kind: int = 1,
                    metrics: dict | None = None, device: str | torch.device = "cpu") -> Path:
    """Draw the figure for the first ``per_kind`` defective items of every kind; returns the path."""
    from PIL import Image, ImageDraw, ImageFont

    picks: list[rdata.ReferItem] = []
    for k in sorted({it.kind for it in items if it.kind in kinds}):
        # one-kind images: the universal prompt's panel is scored against the whole defect area
        picks += [it for it in items if it.kind == k and it.mask.any() and it.whole][:per_kind]
    picks = [it for it in picks if wrong_sentence(it.kind, kinds, it.present)]
    if not picks:
        raise ValueError("no defective held-out items with a wrong-kind sentence to draw")
    sents = {"own": [it.sentences[0] for it in picks],
             "wrong": [wrong_sentence(it.kind, kinds, it.present) for it in picks],
             "universal": [UNIVERSAL_EVAL_PROMPT] * len(picks)}
    imgs = [it.image for it in picks]
    preds = {k: predict_masks(model, text, imgs, s, torch.device(device)) for k, s in sents.items()}

    font = ImageFont.load_default(size=12)
    cols = 4
    head = 24 if metrics else 0
    fig = Image.new("RGB", (cols * PANEL_PX, head + len(picks) * (PANEL_PX + TITLE_PX)), "white")
    draw = ImageDraw.Draw(fig)
    if metrics:
        draw.text((4, 4), "held-out mIoU  own sentence %.3f | wrong-kind sentence %.3f | universal %.3f"
                  % (metrics["kind"]["miou"], metrics["wrong_kind"]["miou"], metrics["universal"]["miou"]),
                  fill="black", font=ImageFont.load_default(size=14))
    for r, it in enumerate(picks):
        y = head + r * (PANEL_PX + TITLE_PX)
        panels = [("ground truth: " + it.kind, it.mask, None)]
        for key in ("own", "wrong", "universal"):
            m = preds[key][r]
            panels.append((f"{sents[key][r][:30]}", m, _iou(m, it.mask)))
        for c, (title, mask, iou) in enumerate(panels):
            tile = Image.fromarray(_overlay(it.image, mask)).resize((PANEL_PX, PANEL_PX), Image.NEAREST)
            fig.paste(tile, (c * PANEL_PX, y + TITLE_PX))
            draw.text((c * PANEL_PX + 3, y + 2), title, fill="black", font=font)
            if iou is not None:
                draw.text((c * PANEL_PX + 3, y + 17), f"IoU {iou:.2f}", fill="black", font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out_path)
    return out_path
