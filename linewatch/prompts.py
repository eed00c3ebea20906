"""IAP-AS: image-aware prompts and region scoring.

Prompts are composed from tags of what the image shows rather than one fixed sentence: the
recipe's product name and material (from config) and surface attributes measured from the pixels
with numpy (brightness, contrast, texture, dominant orientation). Templates with ``{placeholders}``
turn tags into sentences for a referring segmenter (DQFormer) or a CLIP text encoder.

Region scoring: candidate regions (connected components of a predicted mask) smaller than
``min_region_fraction`` or larger than ``max_region_fraction`` of the image are dropped; the image
score is ``Score = sum_i s_i * m_i`` over the kept regions, ``s_i`` the region's confidence (mean
anomaly probability inside it) and ``m_i`` its mask share (its area / the kept mask's area), so
the score is an area-weighted confidence in [0, 1] and 0 when nothing is kept.
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .frames import Region

logger = logging.getLogger(__name__)

# placeholders a template may use; anything else is a config error
PLACEHOLDERS = ("defect", "product", "material", "brightness", "contrast", "texture", "orientation")

# attribute cut points (on 0..1 grey values / gradient magnitudes); chosen so that the shared
# magnetic_tile and KolektorSDD images spread over the words, not to be exact physics
BRIGHTNESS_CUTS = (0.25, 0.6)  # dark < 0.25 <= medium < 0.6 <= bright
CONTRAST_CUTS = (0.06, 0.18)  # std of grey values: low | medium | high
TEXTURE_CUTS = (0.025, 0.07)  # mean gradient magnitude: smooth | textured | rough
ORIENTATION_COHERENCE = 0.25  # structure-tensor coherence above which a direction is named
ANALYSIS_SIDE_PX = 128  # attributes are measured on a copy resized to about this side


class PromptTemplateError(ValueError):
    """A prompt template names an unknown placeholder or is not a valid format string."""


@dataclass(frozen=True, slots=True)
class ImageTags:
    """What the image shows, as words (plus the numbers they came from, for logs and tests)."""

    brightness: str
    contrast: str
    texture: str
    orientation: str
    mean: float
    std: float
    gradient: float
    coherence: float

    def words(self) -> dict[str, str]:
        return {"brightness": self.brightness, "contrast": self.contrast, "texture": self.texture,
                "orientation": self.orientation}


def _grey01(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr.mean(axis=2) if arr.shape[2] > 1 else arr[..., 0]
    dtype = np.asarray(image).dtype
    arr = arr.astype(np.float32)
    if np.issubdtype(dtype, np.integer):  # the full range of its type (a 16-bit frame is not 255-based)
        arr /= float(np.iinfo(dtype).max)
    step = max(1, int(round(max(arr.shape) / ANALYSIS_SIDE_PX)))
    return arr[::step, ::step]


def _bucket(value: float, cuts: tuple[float, float], words: tuple[str, str, str]) -> str:
    return words[0] if value < cuts[0] else words[1] if value < cuts[1] else words[2]


def measure_tags(image: np.ndarray) -> ImageTags:
    """Brightness, contrast, texture and dominant orientation of an integer (scaled by its type's
    maximum: uint8 by 255, uint16 by 65535) or 0..1 float image.

    Texture is the mean gradient magnitude; orientation comes from the structure tensor: with
    coherence above ``ORIENTATION_COHERENCE`` the stripes are called ``horizontal`` or
    ``vertical`` (or ``diagonal``), else ``uniform``.
    """
    g = _grey01(image)
    mean, std = float(g.mean()), float(g.std())
    if min(g.shape) < 3:
        return ImageTags(_bucket(mean, BRIGHTNESS_CUTS, ("dark", "medium", "bright")),
                         _bucket(std, CONTRAST_CUTS, ("low contrast", "medium contrast", "high contrast")),
                         "smooth", "uniform", mean, std, 0.0, 0.0)
    gy, gx = np.gradient(g)
    grad = float(np.hypot(gx, gy).mean())
    jxx, jyy, jxy = float((gx * gx).mean()), float((gy * gy).mean()), float((gx * gy).mean())
    tr = jxx + jyy
    coherence = float(np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / tr) if tr > 1e-12 else 0.0
    if coherence < ORIENTATION_COHERENCE:
        orientation = "uniform"
    else:
        # gradient direction is across the stripes: strong x-gradients = vertical stripes
        angle = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))  # dominant gradient direction
        a = abs(angle)
        orientation = "vertical" if a < 22.5 else "horizontal" if a > 67.5 else "diagonal"
    return ImageTags(
        brightness=_bucket(mean, BRIGHTNESS_CUTS, ("dark", "medium", "bright")),
        contrast=_bucket(std, CONTRAST_CUTS, ("low contrast", "medium contrast", "high contrast")),
        texture=_bucket(grad, TEXTURE_CUTS, ("smooth", "textured", "rough")),
        orientation=orientation, mean=mean, std=std, gradient=grad, coherence=coherence)


def check_template(template: str, defect: bool = True) -> str:
    """Validate one template; returns it or raises PromptTemplateError naming the problem.

    Placeholders are plain names from ``PLACEHOLDERS`` (no format spec or conversion: "{defect:d}"
    would fail on every frame). The template must keep words on every frame whatever its tags
    measure: words of its own, or ``{defect}`` when ``defect`` (a defect phrase is never empty);
    "{orientation} {material}" would be an empty sentence on a plain frame."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise PromptTemplateError(f"prompt template {template!r}: {exc}") from None
    names = [f for _, f, _, _ in parts if f is not None]
    unknown = [n for n in names if n not in PLACEHOLDERS]
    if unknown:
        raise PromptTemplateError(f"prompt template {template!r}: unknown placeholder(s) "
                                  f"{unknown}; allowed: {list(PLACEHOLDERS)}")
    fancy = [f for _, f, spec, conv in parts if f is not None and (spec or conv)]
    if fancy:
        raise PromptTemplateError(f"prompt template {template!r}: placeholder(s) {fancy} carry a format "
                                  f"spec or conversion (':' or '!'); write them plainly, e.g. {{defect}}")
    if not any(lit.strip() for lit, _, _, _ in parts) and not (defect and "defect" in names):
        need = "words of its own or {defect}" if defect else "words of its own"
        raise PromptTemplateError(f"prompt template {template!r} can come out empty (tags and material "
                                  f"may be empty on a frame): give it {need}")
    return template


def compose(templates: list[str], defects: list[str], product: str, material: str = "",
            tags: ImageTags | None = None) -> list[str]:
    """Sentences from every template x defect phrase, with the product, material and image tags
    filled in (an empty tag drops out; repeated spaces collapse). Order kept, duplicates dropped."""
    words = {"product": product, "material": material, "brightness": "", "contrast": "",
             "texture": "", "orientation": ""}
    if tags is not None:
        words.update(tags.words())
        if words["orientation"] == "uniform":  # "uniform" says nothing useful in a sentence
            words["orientation"] = ""
    out = []
    for t in templates:
        for d in defects:
            s = check_template(t).format(defect=d, **words)
            out.append(re.sub(r"\s+", " ", s).strip())
    return list(dict.fromkeys(s for s in out if s))


@dataclass(slots=True)
class RegionScore:
    """The outcome of region scoring on one image."""

    mask: np.ndarray  # bool H x W, the kept regions only
    regions: list[Region]  # kept regions, largest first; Region.score = s_i
    shares: list[float]  # m_i of each kept region, same order
    score: float  # sum_i s_i * m_i
    dropped: int  # candidate regions removed by the size filter
    # the components larger than max_region_fraction, scored alike (label "oversized <label>");
    # None when there is none: not a defect, but no reason to call the image fine either
    oversized: "RegionScore | None" = None


def score_regions(mask: np.ndarray, prob: np.ndarray, min_region_fraction: float,
                  max_region_fraction: float = 1.0, label: str = "anomaly") -> RegionScore:
    """Filter the connected components of ``mask`` by size relative to the image and score them.

    ``prob`` float H x W in [0, 1] is the anomaly probability; ``s_i`` is its mean inside region
    i. Components are 8-connected. A region is kept when ``min_region_fraction <= area / (H*W)
    <= max_region_fraction``; the larger ones are scored apart in ``oversized``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != prob.shape:
        raise ValueError(f"mask {mask.shape} and probability {prob.shape} differ in shape")
    total = mask.size
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return RegionScore(np.zeros_like(mask), [], [], 0.0, 0)
    idx = np.arange(1, n + 1)
    areas = np.asarray(ndimage.sum_labels(np.ones_like(labels), labels, idx), dtype=np.int64)
    means = np.asarray(ndimage.mean(prob, labels, idx), dtype=np.float64)
    boxes = ndimage.find_objects(labels)
    frac = areas / float(total)

    def scored(sel: np.ndarray, name: str, dropped: int) -> RegionScore:
        sel_area = int(areas[sel].sum())
        regions, shares = [], []
        for i in np.flatnonzero(sel):
            ys, xs = boxes[i]
            regions.append(Region((int(xs.start), int(ys.start), int(xs.stop), int(ys.stop)),
                                  int(areas[i]), float(means[i]), name))
            shares.append(float(areas[i]) / sel_area)
        order = np.argsort([-r.area_px for r in regions], kind="stable")
        regions = [regions[i] for i in order]
        shares = [shares[i] for i in order]
        score = float(sum(r.score * m for r, m in zip(regions, shares)))
        sel_mask = np.isin(labels, idx[sel]) if sel.any() else np.zeros_like(mask)
        return RegionScore(sel_mask, regions, shares, score, dropped)

    keep = (frac >= min_region_fraction) & (frac <= max_region_fraction)
    out = scored(keep, label, int(n - keep.sum()))
    big = frac > max_region_fraction
    if big.any():
        out.oversized = scored(big, f"oversized {label}", 0)
    return out
