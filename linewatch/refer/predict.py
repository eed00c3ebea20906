"""Inference helper for engines: ``ReferringSegmenter.predict(image, sentence) -> bool mask``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..models.backbone import preprocess, resize_uint8
from ..models.dqformer import ANOMALY, DQFormer, load_checkpoint
from ..models.text import TextEncoder

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """Mask (bool H x W) and anomaly probability (float32 H x W) in the input image's grid."""

    mask: np.ndarray
    prob: np.ndarray

    @property
    def score(self) -> float:
        """Image score: the highest anomaly probability (0 when nothing is there)."""
        return float(self.prob.max()) if self.prob.size else 0.0


class ReferringSegmenter:
    """A DQFormer plus its text encoder, for inference on uint8 images of any size.

    Images are resized to the model's ``image_hw``; outputs are resized back (masks by nearest,
    probabilities bilinearly). The mask is the per-pixel argmax of the two query masks.

    ``runner`` (optional): the model exported and loaded by another backend (see
    :class:`ExportedModel`); the torch model then only supplies its configuration.
    """

    def __init__(self, model: DQFormer, text: TextEncoder | None = None, device: str = "cpu",
                 version: str = "", runner=None):
        self.model = model.eval()
        self.config = model.config
        self.text = text or TextEncoder(max_tokens=model.config.max_tokens)
        self.version = version
        self.use_runner(runner, device)

    def use_runner(self, runner, device: str = "cpu") -> None:
        """Run the model through ``runner`` from now on (None: the torch model on ``device``).
        With a runner the torch weights are released: only the model's configuration is kept."""
        if runner is None:
            self.device = torch.device(device)
            self.net = self.model.to(self.device)
        else:  # the backend places its own inputs: the tensors handed to it stay on the CPU
            self.device = torch.device("cpu")
            self.net = ExportedModel(runner)
            self.model = None

    @classmethod
    def from_checkpoint(cls, path: Path | str, device: str = "cpu", data: bytes | None = None
                        ) -> "ReferringSegmenter":
        """Load ``path`` (a file written by ``linewatch train dqformer``); ``data``: its bytes,
        already read."""
        model, blob = load_checkpoint(path, map_location="cpu", data=data)
        version = f"dqformer-{Path(path).stem}-e{blob.get('epoch', 0)}"
        return cls(model, TextEncoder(max_tokens=model.config.max_tokens), device, version)

    @torch.no_grad()
    def predict_batch(self, images: list[np.ndarray], sentences: list[str]) -> list[Prediction]:
        """One sentence per image; images uint8 H x W x C (C = 1 or 3), sizes may differ."""
        if len(images) != len(sentences):
            raise ValueError(f"{len(images)} images but {len(sentences)} sentences")
        h, w = self.config.image_hw
        batch = np.stack([_as_hwc(resize_uint8(_as_hwc(im), h, w)) for im in images])
        x = preprocess(batch).to(self.device)
        enc = self.text.encode(sentences).to(self.device)
        logits = self.net(x, enc.tokens, enc.mask, enc.pooled)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        out = []
        for i, im in enumerate(images):
            li = logits[i:i + 1]
            if im.shape[:2] != (h, w):
                li = F.interpolate(li, size=im.shape[:2], mode="bilinear", align_corners=False)
            prob = li.softmax(1)[0, ANOMALY].float().cpu().numpy()
            mask = (li.argmax(1)[0] == ANOMALY).cpu().numpy()
            out.append(Prediction(mask, prob.astype(np.float32)))
        return out

    def predict(self, image: np.ndarray, sentence: str) -> np.ndarray:
        """Bool mask H x W (True = the defect the sentence describes) in ``image``'s grid."""
        return self.predict_batch([image], [sentence])[0].mask


class ExportedModel:
    """A DQFormer exported and loaded by another backend, called like the torch module:
    ``(image, words, word_mask, sentence)`` CPU tensors -> logits (a CPU tensor). ``runner.run``
    takes the export's named numpy inputs and returns its outputs
    (``linewatch.runtime.create_dqformer_runner``: ONNX Runtime, TensorRT)."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, image: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                 sentence: torch.Tensor) -> torch.Tensor:
        from ..runtime.models import DQFORMER  # the export's input names, in forward's order

        inputs = (image, words, word_mask, sentence)
        out = self.runner.run({n: t.numpy() for n, t in zip(DQFORMER.input_names, inputs)})[0]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def eval(self) -> "ExportedModel":
        return self  # an exported graph is always in inference mode


def _as_hwc(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {arr.dtype}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr
