"""The CLIP engine: zero-shot prompt-vs-patch similarity with CLIP weights from a local folder.

Anomalous prompts are composed per frame by IAP-AS (``[engine.prompts]``, per-recipe overrides in
``[engine.recipes]``, tags measured from the frame); normal prompts from ``normal_templates``.
The output is a per-pixel anomaly probability map (no mask): the inspector thresholds it like the
zero-shot engine's map. The image score is the map's maximum, so a frame is NG exactly when some
pixel is above the threshold. Needs the optional extra ``clip`` (transformers).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from ..config import ClipEngine as ClipEngineConfig
from ..config import PromptConfig
from ..frames import EngineOutput, FrameMeta
from ..prompts import compose, measure_tags
from . import EngineUnavailable
from .dqformer import prompts_for

logger = logging.getLogger(__name__)


class ClipEngine:
    """Tier-1 engine around :class:`linewatch.models.clip.ClipScorer` (``scorer`` for tests)."""

    def __init__(self, cfg: ClipEngineConfig, scorer=None):
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if scorer is None:
            from ..models.clip import ClipScorer, ClipWeightsError

            try:
                scorer = ClipScorer.from_folder(cfg.weights, device=cfg.device)
            except ClipWeightsError as exc:
                raise EngineUnavailable(str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - unreadable or inconsistent files (OSError,
                # ValueError, transformers' RuntimeError, safetensors' SafetensorError on a truncated copy)
                raise EngineUnavailable(f"cannot load CLIP weights from {cfg.weights}: "
                                        f"{type(exc).__name__}: {exc}") from None
        self.scorer = scorer
        self.name = "clip"
        self.version = getattr(scorer, "version", "clip")
        self._prompts: dict[str, PromptConfig] = {}

    def sentences(self, image: np.ndarray, recipe: str) -> tuple[list[str], list[str]]:
        """(normal, anomalous) prompts for ``image`` under ``recipe``."""
        pc = self._prompts.get(recipe)
        if pc is None:
            pc = self._prompts[recipe] = prompts_for(self.cfg, recipe)
        tags = measure_tags(image) if pc.image_tags else None
        anomalous = compose(pc.templates, pc.defects, pc.product, pc.material, tags)
        normal = compose(self.cfg.normal_templates, [""], pc.product, pc.material, tags)
        return normal, anomalous

    def warmup(self, height: int, width: int, channels: int) -> None:
        img = np.zeros((height, width, channels), np.uint8)
        self.infer([img], [FrameMeta(frame_id=-1, t_capture=0.0, camera="warmup", height=height,
                                     width=width)])

    def infer(self, images: Sequence[np.ndarray], metas: Sequence[FrameMeta]) -> list[EngineOutput]:
        prompts = [self.sentences(img, meta.recipe) for img, meta in zip(images, metas)]
        maps, _glob = self.scorer.score(list(images), [p[0] for p in prompts], [p[1] for p in prompts],
                                        self.cfg.temperature)
        return [EngineOutput(score_map=m, image_score=float(m.max())) for m in maps]

    def lot_closed(self, lot_id: str) -> dict[int, EngineOutput]:
        return {}

    def close(self) -> None:
        self._prompts.clear()
