"""CLIP from a local folder, and prompt-vs-patch similarity scoring (WinCLIP / MaskCLIP style).

The folder holds a CLIP model in Hugging Face layout (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``, tokenizer files, optionally ``preprocessor_config.json``), e.g. a copy of
openai/clip-vit-base-patch16 made on a machine with internet. It is loaded with
``local_files_only=True`` and ``HF_HUB_OFFLINE=1``: nothing is ever fetched from a hub.

Scoring: the vision transformer's patch tokens go through the final layer norm and the visual
projection into the joint image-text space (as the class token does); each patch is compared by
cosine similarity with the mean embedding of the "normal" prompts and of the "anomalous" prompts;
a softmax over the two similarities divided by ``temperature`` gives the patch's anomaly
probability. The map is upsampled bilinearly to the frame.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

logger = logging.getLogger(__name__)

# CLIP's own normalisation (used when the folder has no preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class ClipWeightsError(FileNotFoundError):
    """The CLIP weights folder is missing or incomplete; the message names the path and the file."""


def check_weights_dir(path: Path | str) -> Path:
    """Return ``path`` if it looks like a local CLIP folder, else raise ClipWeightsError."""
    p = Path(path)
    if not p.is_dir():
        raise ClipWeightsError(f"CLIP weights folder not found: {p} (CLIP weights are never "
                               f"downloaded; copy a Hugging Face CLIP folder there)")
    if not (p / "config.json").is_file():
        raise ClipWeightsError(f"CLIP weights folder {p} has no config.json")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise ClipWeightsError(f"CLIP weights folder {p} has none of {list(WEIGHT_FILES)}")
    # without them transformers builds a tokenizer with an empty vocabulary: every prompt the
    # same embedding, every map 0.5, every part OK
    if not ((p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())):
        raise ClipWeightsError(f"CLIP weights folder {p} has no tokenizer (tokenizer.json, or vocab.json "
                               f"and merges.txt)")
    return p


class ClipScorer:
    """A CLIP model plus tokenizer loaded from a local folder; scores images against prompts."""

    def __init__(self, model, tokenizer, device: str = "cpu", mean=CLIP_MEAN, std=CLIP_STD,
                 version: str = "clip"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        vc = model.config.vision_config
        self.image_size = int(vc.image_size)
        self.patch_size = int(vc.patch_size)
        self.grid = self.image_size // self.patch_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.version = version
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_folder(cls, path: Path | str, device: str = "cpu") -> "ClipScorer":
        """Load a Hugging Face-layout CLIP folder; raises ClipWeightsError when it is not there."""
        p = check_weights_dir(path)
        os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: no hub access
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as exc:
            raise ImportError("the clip engine needs the package 'transformers' "
                              "(pip install 'linewatch[clip]')") from exc
        model, info = CLIPModel.from_pretrained(str(p), local_files_only=True, output_loading_info=True)
        # transformers only logs weights it did not find and initialises them at random: a
        # half-loaded model would pass for the real one
        gaps = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if gaps:
            detail = "; ".join(f"{k}: {len(v)} (e.g. {list(v)[0]})" for k, v in gaps.items())
            raise ClipWeightsError(f"CLIP weights folder {p} does not hold the whole model ({detail})")
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        vocab = getattr(model.config.text_config, "vocab_size", None)
        if vocab is not None and len(tokenizer) != vocab:
            raise ClipWeightsError(f"CLIP weights folder {p}: the tokenizer has {len(tokenizer)} tokens, the "
                                   f"text model {vocab}: another model's tokenizer, or a broken one")
        mean, std = CLIP_MEAN, CLIP_STD
        pre = p / "preprocessor_config.json"
        if pre.is_file():
            d = json.loads(pre.read_text(encoding="utf-8"))
            mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
        from ..runtime.manifest import sha256_file

        weights = next(p / f for f in WEIGHT_FILES if (p / f).is_file())  # the version changes with them
        return cls(model, tokenizer, device, mean, std, version=f"clip-{p.name}-{sha256_file(weights)[:12]}")

    @torch.no_grad()
    def encode_text(self, sentences: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, N x D (cached per sentence)."""
        todo = [s for s in dict.fromkeys(sentences) if s not in self._text_cache]
        if todo:
            tok = self.tokenizer(todo, padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                               attention_mask=tok["attention_mask"].to(self.device))
            emb = out if isinstance(out, torch.Tensor) else out.pooler_output
            for s, e in zip(todo, F.normalize(emb.float(), dim=-1)):
                self._text_cache[s] = e
        return torch.stack([self._text_cache[s] for s in sentences])

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 H x W x C (C = 1 or 3) images of any size -> normalised N x 3 x S x S."""
        xs = []
        for im in images:
            arr = np.asarray(im)
            if arr.ndim == 2:
                arr = arr[..., None]
            # a copy: frames are read-only views into the ring
            t = torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
            if t.shape[1] == 1:
                t = t.expand(-1, 3, -1, -1)
            xs.append(F.interpolate(t, size=(self.image_size, self.image_size), mode="bilinear",
                                    align_corners=False, antialias=True))
        x = torch.cat(xs)
        return ((x - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def embed_image(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(global N x D, patches N x g x g x D), both L2-normalised in the joint space."""
        vm = self.model.vision_model
        hidden = vm(pixel_values=self.preprocess(images)).last_hidden_state  # N x (1+P) x Dv
        tokens = self.model.visual_projection(vm.post_layernorm(hidden))
        tokens = F.normalize(tokens.float(), dim=-1)
        n = tokens.shape[0]
        return tokens[:, 0], tokens[:, 1:].reshape(n, self.grid, self.grid, -1)

    @torch.no_grad()
    def score(self, images: list[np.ndarray], normal: list[list[str]], anomalous: list[list[str]],
              temperature: float = 0.01) -> tuple[list[np.ndarray], np.ndarray]:
        """Per image: an anomaly probability map in the image's pixel grid and a global anomaly
        probability (from the class token). ``normal[i]`` / ``anomalous[i]``: prompts of image i."""
        glob, patches = self.embed_image(images)
        maps, glob_p = [], []
        for i, im in enumerate(images):
            t_norm = F.normalize(self.encode_text(normal[i]).mean(0), dim=-1)
            t_anom = F.normalize(self.encode_text(anomalous[i]).mean(0), dim=-1)
            text = torch.stack([t_norm, t_anom])  # 2 x D
            p = ((patches[i] @ text.T) / temperature).softmax(-1)[..., 1]  # g x g
            h, w = np.asarray(im).shape[:2]
            up = F.interpolate(p[None, None], size=(h, w), mode="bilinear", align_corners=False)
            maps.append(up[0, 0].cpu().numpy().astype(np.float32))
            glob_p.append(float(((glob[i] @ text.T) / temperature).softmax(-1)[1]))
        return maps, np.asarray(glob_p, dtype=np.float32)


def _byte_alphabet() -> list[str]:
    """The GPT-2 / CLIP byte-level alphabet: every byte as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_random_clip(path: Path | str, image_size: int = 64, patch_size: int = 16, width: int = 32,
                      layers: int = 2, projection_dim: int = 16, seed: int = 0) -> Path:
    """Write a small, randomly initialised CLIP (standard architecture: ViT image tower, causal text
    transformer, projections) with a byte-level tokenizer to ``path`` in Hugging Face layout.

    For tests and offline smoke runs of the loading and scoring code: it has learnt nothing.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    chars = _byte_alphabet()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                 num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1, **tower),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
        projection_dim=projection_dim)
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    CLIPModel(cfg).eval().save_pretrained(p)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(p)
    return p
