"""The DQFormer engine: referring segmentation guided by image-aware prompts (IAP-AS).

For every frame the recipe's prompt settings (``[engine.prompts]``, overridden by
``[engine.recipes.<recipe>]``) and the tags measured from the frame compose one or more sentences;
DQFormer segments what each sentence describes. With several sentences the anomaly probabilities
are averaged. The mask is the model's own two-query decision (probability of the anomaly query
above that of the background query): no threshold is tuned. Candidate regions are then filtered
by size relative to the frame and the image score is ``sum_i s_i * m_i`` (see
:mod:`linewatch.prompts`), above 0.5 since every kept pixel's probability is; a frame with no kept
region scores half its highest anomaly probability (below 0.5), so scores rank frames beyond the
OK / NG split. The output carries the mask, so the inspector decides OK / NG by its
regions and never calibrates a threshold for this engine.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import DQFormerEngine as DQFormerEngineConfig
from ..config import PromptConfig
from ..frames import EngineOutput, FrameMeta
from ..models.backbone import resize_uint8
from ..prompts import compose, measure_tags, score_regions
from . import EngineUnavailable

logger = logging.getLogger(__name__)


def prompts_for(cfg, recipe: str) -> PromptConfig:
    """The prompt settings for ``recipe``: the engine's defaults with the recipe's overrides."""
    override = cfg.recipes.get(recipe)
    return override.apply(cfg.prompts) if override is not None else cfg.prompts


class DQFormerEngine:
    """Tier-1 engine around :class:`linewatch.refer.ReferringSegmenter`.

    ``segmenter`` may be given (tests); otherwise the checkpoint named in config is loaded and a
    missing file raises :class:`EngineUnavailable` with a one-line message. On backend onnxruntime
    or tensorrt the segmenter runs the checkpoint's export (``linewatch.runtime``; a TensorRT plan
    is optimised for ``batch_size``, the inspector's batch); a backend that cannot run here
    (missing packages, an unwritable engines_dir) raises ``BackendUnavailable``, an
    ``EngineUnavailable``.
    """

    def __init__(self, cfg: DQFormerEngineConfig, segmenter=None, *, batch_size: int = 4):
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if segmenter is None:
            path = Path(cfg.checkpoint)
            if not path.is_file():
                raise EngineUnavailable(f"DQFormer checkpoint not found: {path} "
                                        f"(set engine.checkpoint; train one with `linewatch train dqformer`)")
            from ..refer.predict import ReferringSegmenter

            try:
                # read once: the version names the bytes loaded, even if a deploy replaces the file
                data = path.read_bytes()
                # another backend runs the export: the torch model only gives its configuration
                segmenter = ReferringSegmenter.from_checkpoint(path, device=cfg.device if cfg.backend == "torch"
                                                               else "cpu", data=data)
            except (ValueError, KeyError, RuntimeError, AttributeError, EOFError, OSError,
                    pickle.UnpicklingError) as exc:  # wrong format, truncated file, mismatched weights
                raise EngineUnavailable(f"cannot load DQFormer checkpoint {path}: {exc}") from None
            self.version = f"{segmenter.version}-{hashlib.sha256(data).hexdigest()[:12]}"
            if cfg.backend != "torch":  # the checkpoint exported (and built) for that backend
                from ..runtime import create_dqformer_runner

                runner, tag = create_dqformer_runner(cfg, batch_size=batch_size)
                segmenter.use_runner(runner)
                self.version = f"{self.version}-{tag}"
        else:
            self.version = getattr(segmenter, "version", "") or "dqformer-custom"
        self.segmenter = segmenter
        self.name = "dqformer"
        self._prompts: dict[str, PromptConfig] = {}

    def _prompt_config(self, recipe: str) -> PromptConfig:
        pc = self._prompts.get(recipe)
        if pc is None:
            pc = self._prompts[recipe] = prompts_for(self.cfg, recipe)
        return pc

    def sentences(self, image: np.ndarray, recipe: str) -> list[str]:
        """The image-aware sentences composed for ``image`` under ``recipe``."""
        pc = self._prompt_config(recipe)
        tags = None
        if pc.image_tags:
            # measured as in training and evaluation: on the image at the model's input size
            # (texture and orientation depend on the scale they are measured at)
            hw = getattr(getattr(self.segmenter, "config", None), "image_hw", None)
            tags = measure_tags(resize_uint8(image, *hw) if hw else image)
        return compose(pc.templates, pc.defects, pc.product, pc.material, tags)

    def warmup(self, height: int, width: int, channels: int) -> None:
        """One inference on a blank frame (loads the text model, allocates buffers)."""
        img = np.zeros((height, width, channels), np.uint8)
        self.infer([img], [FrameMeta(frame_id=-1, t_capture=0.0, camera="warmup", height=height,
                                     width=width)])

    def infer(self, images: Sequence[np.ndarray], metas: Sequence[FrameMeta]) -> list[EngineOutput]:
        per_image = [self.sentences(img, meta.recipe) for img, meta in zip(images, metas)]
        flat_imgs = [img for img, sents in zip(images, per_image) for _ in sents]
        flat_sents = [s for sents in per_image for s in sents]
        preds = self.segmenter.predict_batch(flat_imgs, flat_sents)
        out, k = [], 0
        for img, meta, sents in zip(images, metas, per_image):
            group = preds[k:k + len(sents)]
            k += len(sents)
            if len(group) == 1:
                prob, mask = group[0].prob, group[0].mask
            else:  # several sentences: average the anomaly probability, keep the 2-query rule
                prob = np.mean([p.prob for p in group], axis=0).astype(np.float32)
                mask = prob > 0.5
            pc = self._prompt_config(meta.recipe)
            label = pc.defects[0] if len(pc.defects) == 1 else "anomaly"
            rs = score_regions(mask, prob, pc.min_region_fraction, pc.max_region_fraction, label)
            regions, kept, score = rs.regions, rs.mask, rs.score
            if rs.oversized is not None:
                # a region larger than max_region_fraction is not a plausible defect, but neither is
                # the frame fine (a covered lens, glare, the wrong product, a huge defect): dropping
                # it would publish OK; it stays, labelled, and the frame is NG
                big = rs.oversized
                regions, kept, score = regions + big.regions, kept | big.mask, max(score, big.score)
            if not regions:
                # nothing kept: half the highest anomaly probability, below 0.5 where every kept
                # region's mean is above it, so an NG frame always outscores an OK one and OK frames
                # keep their order (0 for all of them tied every defect-free frame in evaluations)
                score = 0.5 * float(prob.max()) if prob.size else 0.0
            out.append(EngineOutput(score_map=prob, image_score=score, mask=kept, regions=regions))
        return out

    def lot_closed(self, lot_id: str) -> dict[int, EngineOutput]:
        return {}  # tier 1 only: the mask is final

    def close(self) -> None:
        self._prompts.clear()
