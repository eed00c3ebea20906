"""DQFormer: referring industrial anomaly segmentation with two queries (anomaly, background).

Implemented from the RIAS paper's description (no public code or weights exist):

- visual backbone: EfficientNet-Lite0 with its ImageNet weights (strides 4, 8, 16, 32);
- LMA (Language-Gated Multi-level Aggregation): at every level the visual features cross-attend
  to the sentence's word tokens; a learned sigmoid gate, computed from the sentence embedding and
  the pooled visual feature, sets per channel how much language is fused in; a top-down pixel
  decoder then aggregates the language-gated levels into stride-4 mask features;
- mask group transformer: exactly two learned queries (background = 0, anomaly = 1) that attend
  to the multi-scale visual features and to the words, a few layers deep;
- masks = query embeddings . pixel features -> N x 2 x H/4 x W/4 logits; the predicted mask is
  the per-pixel argmax over the two (no threshold to tune).

Text is encoded outside ``forward`` (see :mod:`linewatch.models.text`), so ``forward`` is tensor in,
tensor out and exports to ONNX: ``forward(image, words, word_mask, sentence) -> logits``.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.nn import functional as F

from .backbone import weights_path

logger = logging.getLogger(__name__)

BACKGROUND, ANOMALY = 0, 1
# flat block index ranges of efficientnet_lite_pytorch's EfficientNet-Lite0 ending at each stride
_LEVEL_BLOCKS = {4: (0, 3), 8: (3, 5), 16: (5, 11), 32: (11, 16)}
_LEVEL_CHANNELS = {4: 24, 8: 40, 16: 112, 32: 320}
FREEZE_CHOICES = ("all", "stride8", "none")


@dataclass
class DQFormerConfig:
    """Hyper-parameters; stored in every checkpoint so a model is rebuilt exactly.

    ``freeze``: ``all`` keeps the whole backbone frozen, ``stride8`` freezes up to the stride-8
    stage and fine-tunes the stride-16/32 stages, ``none`` fine-tunes everything (BatchNorm
    statistics always stay frozen: batches are small).
    """

    image_hw: tuple[int, int] = (256, 256)
    dim: int = 64
    heads: int = 4
    decoder_layers: int = 3
    text_dim: int = 384
    max_tokens: int = 24
    freeze: str = "all"
    pretrained: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_hw"] = list(self.image_hw)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DQFormerConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "image_hw" in kw:
            kw["image_hw"] = tuple(int(v) for v in kw["image_hw"])
        return cls(**kw)

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_CHOICES:
            raise ValueError(f"freeze must be one of {FREEZE_CHOICES}, got {self.freeze!r}")
        h, w = self.image_hw
        if h % 32 or w % 32:
            raise ValueError(f"image_hw sides must be multiples of 32, got {self.image_hw}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")


class Lite0Pyramid(nn.Module):
    """EfficientNet-Lite0 trunk returning features at strides 4, 8, 16, 32 (24/40/112/320 ch).

    Split in ``low`` (stem .. stride 8) and ``high`` (stride 16, 32) so a trainer that freezes the
    low part can cache its outputs. BatchNorm layers always run with their ImageNet statistics.
    """

    def __init__(self, pretrained: bool = True):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError("DQFormer needs the package 'efficientnet-lite-pytorch'") from exc
        net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            state = torch.load(str(weights_path()), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.levels = nn.ModuleDict({
            str(s): nn.Sequential(*net._blocks[a:b]) for s, (a, b) in _LEVEL_BLOCKS.items()})

    def train(self, mode: bool = True) -> "Lite0Pyramid":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def low(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c4 = self.levels["4"](self.stem(x))
        return c4, self.levels["8"](c4)

    def high(self, c8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c16 = self.levels["16"](c8)
        return c16, self.levels["32"](c16)


class CrossAttention(nn.Module):
    """Multi-head attention written out (masking by addition) so it exports to ONNX cleanly."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.k(kv).view(b, kv.shape[1], h, d // h).transpose(1, 2)
        v = self.v(kv).view(b, kv.shape[1], h, d // h).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) * self.scale
        if kv_mask is not None:  # True = attend; padded words get a large negative bias
            att = att + (~kv_mask)[:, None, None, :].to(att.dtype) * -1e4
        out = att.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, d))


def _conv_gn(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.GroupNorm(8, cout), nn.ReLU())


class LanguageGatedLevel(nn.Module):
    """LMA at one level: project, cross-attend to words, gate the language term, refine.

    ``out = refine(x + g * (x * L))`` where ``L`` is the per-pixel language context from
    cross-attention and ``g = sigmoid(MLP([sentence, mean(x)]))`` is a per-channel gate in [0, 1].
    """

    def __init__(self, cin: int, dim: int, text_dim: int, heads: int):
        super().__init__()
        self.proj = _conv_gn(cin, dim)
        self.attn = CrossAttention(dim, heads, kv_dim=text_dim)
        self.lang = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.Tanh())
        self.gate = nn.Sequential(nn.Linear(dim + text_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.refine = _conv_gn(dim, dim, 3)

    def forward(self, v: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                sentence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.proj(v)
        b, d, hh, ww = x.shape
        ctx = self.attn(x.flatten(2).transpose(1, 2), words, word_mask)
        ctx = self.lang(ctx.transpose(1, 2).reshape(b, d, hh, ww))
        g = torch.sigmoid(self.gate(torch.cat([sentence, x.mean(dim=(2, 3))], dim=1)))
        fused = x + g[:, :, None, None] * (x * ctx)
        return self.refine(fused), g


class QueryLayer(nn.Module):
    """One mask group transformer layer: queries -> visual level, -> words, self, FFN."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.vis = CrossAttention(dim, heads)
        self.txt = CrossAttention(dim, heads)
        self.self_attn = CrossAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, dim * 4), nn.ReLU(), nn.Linear(dim * 4, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, q, vis, words, word_mask):
        q = self.norms[0](q + self.vis(q, vis))
        q = self.norms[1](q + self.txt(q, words, word_mask))
        q = self.norms[2](q + self.self_attn(q, q))
        return self.norms[3](q + self.ffn(q))


def _sine_pos(dim: int, h: int, w: int, device) -> torch.Tensor:
    """2-D sine positional encoding, (h*w) x dim."""
    d4 = dim // 4
    freq = torch.exp(torch.arange(d4, device=device, dtype=torch.float32) * (-math.log(1e4) / d4))
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq / max(h, 1) * 2 * math.pi * 8
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq / max(w, 1) * 2 * math.pi * 8
    py = torch.cat([ys.sin(), ys.cos()], 1)[:, None, :].expand(h, w, 2 * d4)
    px = torch.cat([xs.sin(), xs.cos()], 1)[None, :, :].expand(h, w, 2 * d4)
    return torch.cat([py, px], -1).reshape(h * w, 4 * d4)


class DQFormer(nn.Module):
    """Two-query referring segmenter. See the module docstring.

    ``forward(image, words, word_mask, sentence)``: image float32 N x 3 x H x W normalised as in
    :func:`linewatch.models.backbone.preprocess`; words N x T x 384; word_mask bool N x T;
    sentence N x 384. Returns logits N x 2 x H/4 x W/4 (channel 1 = anomaly).
    """

    def __init__(self, config: DQFormerConfig | None = None):
        super().__init__()
        self.config = cfg = config or DQFormerConfig()
        d = cfg.dim
        self.backbone = Lite0Pyramid(pretrained=cfg.pretrained)
        self.lma = nn.ModuleDict({str(s): LanguageGatedLevel(c, d, cfg.text_dim, cfg.heads)
                                  for s, c in _LEVEL_CHANNELS.items() if s != 4})
        self.smooth = nn.ModuleDict({str(s): _conv_gn(d, d, 3) for s in (16, 8)})
        # stride 4 only sharpens boundaries: a lateral 1x1 and a depthwise-separable 3x3 (cheap)
        self.lateral4 = _conv_gn(_LEVEL_CHANNELS[4], d)
        self.smooth4 = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, groups=d, bias=False),
                                     _conv_gn(d, d))
        self.mask_head = nn.Conv2d(d, d, 1)
        self.queries = nn.Embedding(2, d)
        self.level_embed = nn.Embedding(3, d)
        self.word_proj = nn.Linear(cfg.text_dim, d)
        self.sent_proj = nn.Linear(cfg.text_dim, d)
        self.layers = nn.ModuleList(QueryLayer(d, cfg.heads) for _ in range(cfg.decoder_layers))
        self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.last_gates: dict[str, torch.Tensor] = {}
        self.set_freeze(cfg.freeze)

    def set_freeze(self, freeze: str) -> None:
        """Apply a freeze policy (``all`` | ``stride8`` | ``none``) to the backbone."""
        if freeze not in FREEZE_CHOICES:
            raise ValueError(f"freeze must be one of {FREEZE_CHOICES}, got {freeze!r}")
        self.config.freeze = freeze
        bb = self.backbone
        for p in bb.parameters():
            p.requires_grad_(freeze == "none")
        if freeze == "stride8":
            for s in ("16", "32"):
                for p in bb.levels[s].parameters():
                    p.requires_grad_(True)

    def forward(self, image: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                sentence: torch.Tensor) -> torch.Tensor:
        c4, c8 = self.backbone.low(image)
        return self.forward_from_low(c4, c8, words, word_mask, sentence)

    def forward_from_low(self, c4: torch.Tensor, c8: torch.Tensor, words: torch.Tensor,
                         word_mask: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Forward from the backbone's stride-4/8 features (what a frozen-trunk trainer caches)."""
        c16, c32 = self.backbone.high(c8)
        return self.forward_from_levels(c4, c8, c16, c32, words, word_mask, sentence)

    def forward_from_levels(self, c4: torch.Tensor, c8: torch.Tensor, c16: torch.Tensor,
                            c32: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                            sentence: torch.Tensor) -> torch.Tensor:
        """Forward from all four backbone levels (cached when the whole backbone is frozen)."""
        feats = {"8": c8, "16": c16, "32": c32}
        gated, gates = {}, {}
        for s, f in feats.items():
            gated[s], gates[s] = self.lma[s](f, words, word_mask, sentence)
        self.last_gates = gates
        # top-down aggregation of the language-gated levels (pixel decoder)
        p = {"32": gated["32"]}
        prev = gated["32"]
        for s in ("16", "8"):
            up = F.interpolate(prev, size=gated[s].shape[-2:], mode="bilinear", align_corners=False)
            prev = self.smooth[s](gated[s] + up)
            p[s] = prev
        up = F.interpolate(prev, size=c4.shape[-2:], mode="bilinear", align_corners=False)
        p["4"] = self.smooth4(self.lateral4(c4) + up)
        mask_feats = self.mask_head(p["4"])
        # mask group transformer: two queries, round-robin over strides 32, 16, 8
        image_batch = c4.shape[0]
        w = self.word_proj(words)
        q = self.queries.weight[None].expand(image_batch, -1, -1) + self.sent_proj(sentence)[:, None]
        mem = []
        for i, s in enumerate(("32", "16", "8")):
            f = p[s]
            pos = _sine_pos(f.shape[1], f.shape[2], f.shape[3], f.device)
            mem.append(f.flatten(2).transpose(1, 2) + pos[None] + self.level_embed.weight[i])
        for i, layer in enumerate(self.layers):
            q = layer(q, mem[i % 3], w, word_mask)
        emb = self.mask_embed(q)
        return torch.einsum("bqd,bdhw->bqhw", emb, mask_feats)


def predict_mask(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel choice between the two query masks: bool N x h x w (True = anomaly)."""
    return logits.argmax(dim=1) == ANOMALY


def anomaly_probability(logits: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the anomaly query, N x h x w in [0, 1] (a score map)."""
    return logits.softmax(dim=1)[:, ANOMALY]


def dqformer_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                  max_pos_weight: float = 10.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Class-balanced per-pixel CE over {background, anomaly} + dice on the anomaly mask.

    ``target`` float/bool N x H x W (1 = anomaly), at any resolution: logits are upsampled to it.
    The anomaly weight is sqrt(#background / #anomaly) over the batch, capped at ``max_pos_weight``.
    """
    target = target.float()
    up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    n_pos = target.sum()
    n_neg = target.numel() - n_pos
    pos_w = (n_neg / n_pos.clamp(min=1.0)).sqrt().clamp(1.0, max_pos_weight)
    weight = torch.stack([torch.ones_like(pos_w), pos_w]).detach()
    ce = F.cross_entropy(up, target.long(), weight=weight)
    prob = up.softmax(dim=1)[:, ANOMALY]
    inter = (prob * target).flatten(1).sum(1)
    denom = prob.flatten(1).sum(1) + target.flatten(1).sum(1)
    dice = (1.0 - (2.0 * inter + 1.0) / (denom + 1.0)).mean()
    loss = ce + dice_weight * dice
    return loss, {"ce": float(ce.detach()), "dice": float(dice.detach())}


# ------------------------------------------------------------------------------ checkpoints
CHECKPOINT_FORMAT = "linewatch-dqformer/1"


def save_checkpoint(path, model: DQFormer, text_model: str, metrics: dict | None = None,
                    **extra) -> None:
    """Write ``{format, state_dict, config, text_model, metrics, **extra}`` with torch.save,
    atomically (temp file + rename) so a crash never leaves a half-written checkpoint."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": CHECKPOINT_FORMAT, "state_dict": model.state_dict(),
            "config": model.config.to_dict(), "text_model": text_model,
            "metrics": metrics or {}, **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_checkpoint(path, map_location: str = "cpu", data: bytes | None = None) -> tuple[DQFormer, dict]:
    """Rebuild a DQFormer from a checkpoint; returns (model in eval mode, the checkpoint dict).
    ``data``: the file's bytes, already read (``path`` then only names it in errors).

    The backbone is built without re-reading the ImageNet file: the state dict holds it."""
    blob = torch.load(io.BytesIO(data) if data is not None else str(path), map_location=map_location,
                      weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        fmt = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path}: not a DQFormer checkpoint (format {fmt!r})")
    from .text import TEXT_MODEL_NAME

    if blob.get("text_model", TEXT_MODEL_NAME) != TEXT_MODEL_NAME:
        # the fused sentence embeddings would come from another encoder than the one trained with
        raise ValueError(f"{path}: trained with sentence encoder {blob['text_model']!r}, "
                         f"this build has {TEXT_MODEL_NAME!r}")
    cfg = DQFormerConfig.from_dict({**blob["config"], "pretrained": False})
    model = DQFormer(cfg)
    model.load_state_dict(blob["state_dict"], strict=True)
    model.config.pretrained = bool(blob["config"].get("pretrained", True))
    return model.eval(), blob
