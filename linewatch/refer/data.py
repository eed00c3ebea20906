"""Referring segmentation data: the JSON format, its builders, and an in-memory data set.

Format (see docs/referring-format.md)::

    {"format": "linewatch-refer/1", "name": "magnetic_tile", "seed": 0,
     "universal_prompts": ["any defect", ...],
     "kind_sentences": {"crack": ["a crack", ...], ...},
     "samples": [{"image": path, "mask": path | null, "sentences": [...],
                  "kind": "crack" | "good", "split": "train" | "test"}, ...]}

Relative paths are relative to the JSON file's folder. ``mask`` null means an empty mask (a
defect-free image). Builders: :func:`build_magnetic_tile`, :func:`build_kolektorsdd`,
:func:`build_synthetic`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..acquire.defects import mask_bbox, position_word, size_word
from ..datasets import list_samples, load_image, load_mask
from ..models.backbone import resize_uint8

logger = logging.getLogger(__name__)

FORMAT = "linewatch-refer/1"
UNIVERSAL_PROMPTS = ("any defect", "an anomaly", "a defect on the surface", "anything abnormal")
UNIVERSAL_EVAL_PROMPT = "any defect"
SPLITS = ("train", "test")

MAGNETIC_TILE_PHRASES = {
    "blowhole": ["a blowhole", "a small round hole", "a pore", "a gas hole"],
    "break": ["a break", "a broken edge", "a chipped corner", "a missing piece"],
    "crack": ["a crack", "a thin crack", "a crack line", "a hairline crack"],
    "fray": ["a fray", "a frayed edge", "a worn rough patch", "a frayed area"],
    "uneven": ["an uneven surface", "an uneven region", "an unevenly ground area", "a bumpy patch"],
}
KOLEKTOR_PHRASES = {"crack": ["a crack", "a surface crack", "a small crack", "a fracture"]}
SYNTHETIC_PHRASES = {
    "scratch": ["a scratch", "a scratch mark", "a linear scratch"],
    "spot": ["a spot", "a stain", "a blemish"],
    "crack": ["a crack", "a thin crack", "a branching crack"],
    "missing": ["a missing chunk", "a missing piece", "a hole where material is missing"],
}


class ReferDataError(ValueError):
    """A referring data file is malformed: the message names the file and the problem."""


def kind_sentences(phrases: list[str], obj: str) -> list[str]:
    """Sentences for one defect kind from its phrases and the object name, via a few templates."""
    out = []
    for p in phrases:
        out += [p, f"{p} on the {obj}", f"{p} on the {obj} surface"]
    return list(dict.fromkeys(out))


def spatial_sentences(phrase: str, obj: str, mask: np.ndarray) -> list[str]:
    """Sentences that also say where and how large the defect is, from its ground-truth mask."""
    if not mask.any():
        return []
    h, w = mask.shape
    bbox = mask_bbox(mask)
    pos = position_word(bbox, h, w).replace("-", " ")
    size = size_word(int(mask.sum()), h, w)
    where = f"in the {pos} area"
    noun = phrase.split(" ", 1)[1] if phrase.startswith(("a ", "an ")) else phrase
    art = "an" if size[0] in "aeiou" else "a"
    return [f"{phrase} {where} of the {obj}", f"{art} {size} {noun} {where}"]


def _split(items: list, test_fraction: float, rng: random.Random) -> list[tuple[object, str]]:
    items = list(items)
    rng.shuffle(items)
    n_test = int(round(len(items) * test_fraction))
    return [(it, "test" if i < n_test else "train") for i, it in enumerate(items)]


def _doc(name: str, seed: int, kinds: dict[str, list[str]], samples: list[dict]) -> dict:
    return {"format": FORMAT, "name": name, "seed": seed, "universal_prompts": list(UNIVERSAL_PROMPTS),
            "kind_sentences": kinds, "samples": samples}


def build_magnetic_tile(root: Path | str, seed: int = 0, test_fraction: float = 0.2,
                        n_free: int = 120) -> dict:
    """Referring data for magnetic_tile: every defective image with kind sentences (templated
    and spatial), plus ``n_free`` defect-free images (empty mask, universal prompts). Split per
    kind by ``seed``."""
    rng = random.Random(seed)
    samples = list_samples(Path(root), layout="kinds")
    kinds = {k: kind_sentences(v, "magnetic tile") for k, v in MAGNETIC_TILE_PHRASES.items()}
    out: list[dict] = []
    by_kind: dict[str, list] = {}
    for s in samples:
        by_kind.setdefault(s.kind, []).append(s)
    unknown = set(by_kind) - set(kinds) - {"good"}
    if unknown:
        raise ReferDataError(f"{root}: kinds without sentences: {sorted(unknown)}")
    empty: list[str] = []
    for kind in sorted(k for k in by_kind if k != "good"):
        for s, split in _split(by_kind[kind], test_fraction, rng):
            if s.mask is None:
                raise ReferDataError(f"{s.image}: a {kind} image without its ground-truth mask")
            mask = load_mask(s.mask, load_image(s.image, channels=1).shape[:2])
            if not mask.any():
                # a defect sentence with an empty target would teach "this kind -> nothing", and
                # a right detection would score as a false positive; skipped after the split is
                # drawn, so every other image keeps its split
                empty.append(f"{split}:{Path(s.image).name}")
                continue
            sents = kinds[kind] + spatial_sentences(MAGNETIC_TILE_PHRASES[kind][0], "tile", mask)
            out.append({"image": str(s.image), "mask": str(s.mask) if s.mask else None,
                        "sentences": sents, "kind": kind, "split": split})
    free = sorted(by_kind.get("good", []), key=lambda s: str(s.image))
    rng.shuffle(free)
    for s, split in _split(free[:n_free], test_fraction, rng):
        out.append({"image": str(s.image), "mask": None, "sentences": list(UNIVERSAL_PROMPTS),
                    "kind": "good", "split": split})
    if empty:
        logger.warning("magnetic_tile: %d defective image(s) with an empty mask left out: %s", len(empty),
                       ", ".join(empty))
    return _doc("magnetic_tile", seed, kinds, out)


def build_kolektorsdd(root: Path | str, seed: int = 0, test_fraction: float = 0.2,
                      n_free: int = 60) -> dict:
    """Referring data for KolektorSDD: defective images ("a crack on the commutator ..."), plus
    ``n_free`` defect-free images with an empty mask and universal prompts. Split by physical
    item (kosNN) so the 8 photos of one commutator never straddle train and test."""
    rng = random.Random(seed)
    samples = list_samples(Path(root), layout="kolektor")
    kinds = {k: kind_sentences(v, "commutator") for k, v in KOLEKTOR_PHRASES.items()}
    groups = sorted({s.group for s in samples})
    split_of = {g: sp for g, sp in _split(groups, test_fraction, rng)}
    out: list[dict] = []
    free = []
    for s in samples:
        if s.defective:
            mask = load_mask(s.mask, load_image(s.image, channels=1).shape[:2])
            sents = kinds["crack"] + spatial_sentences("a crack", "commutator", mask)
            out.append({"image": str(s.image), "mask": str(s.mask), "sentences": sents,
                        "kind": "crack", "split": split_of[s.group]})
        else:
            free.append(s)
    rng.shuffle(free)
    for s in free[:n_free]:
        out.append({"image": str(s.image), "mask": None, "sentences": list(UNIVERSAL_PROMPTS),
                    "kind": "good", "split": split_of[s.group]})
    return _doc("kolektorsdd", seed, kinds, out)


SYNTHETIC_SEED_OFFSET = 1_000_003  # the referring set's line is not the one evaluated (seed 0)


def build_synthetic(out_dir: Path | str, n_frames: int = 200, seed: int = 0,
                    test_fraction: float = 0.2, height: int = 256, width: int = 256,
                    defect_rate: float = 0.6, product: str = "brushed_metal") -> dict:
    """Referring data from the synthetic line (:mod:`linewatch.acquire.synthetic`).

    Frames and masks are written as PNGs under ``out_dir``. A defective frame gives one sample
    per defect kind in it (mask = ground truth inside that kind's boxes; sentences from the kind,
    its size and position, as recorded in ``meta.extra["defects"]``) and, when it holds two
    kinds, one more sample with the whole mask and the universal prompts. Defect-free frames
    get an empty mask and the universal prompts. Split per frame by ``seed``.

    The frames come from the line seeded ``seed + SYNTHETIC_SEED_OFFSET``: the daemon's default
    line and `linewatch synth` (seed 0) render other frames, so an evaluation on them never
    meets a training frame under another file name.
    """
    from PIL import Image

    from ..acquire.synthetic import SyntheticLine
    from ..config import SyntheticSource

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    line = SyntheticLine(SyntheticSource(width=width, height=height, channels=3, seed=seed + SYNTHETIC_SEED_OFFSET,
                                         defect_rate=defect_rate, product=product, fps=0))
    line.open()
    rng = random.Random(seed)
    kinds = {k: kind_sentences(v, "part") for k, v in SYNTHETIC_PHRASES.items()}
    out: list[dict] = []
    for i in range(n_frames):
        image, mask, extra = line.render(i)
        img_p = out_dir / f"frame_{i:05d}.png"
        Image.fromarray(image.squeeze()).save(img_p)
        split = "test" if rng.random() < test_fraction else "train"
        defects = extra.get("defects", [])
        if not defects or not mask.any():
            out.append({"image": str(img_p), "mask": None, "sentences": list(UNIVERSAL_PROMPTS),
                        "kind": "good", "split": split})
            continue
        for kind in sorted({d["kind"] for d in defects}):
            box = np.zeros_like(mask)
            for d in defects:
                if d["kind"] == kind:
                    x0, y0, x1, y1 = d["bbox"]
                    box[y0:y1, x0:x1] = True
            m = mask & box
            if not m.any():
                continue
            mask_p = out_dir / f"frame_{i:05d}_{kind}_mask.png"
            Image.fromarray(m.astype(np.uint8) * 255).save(mask_p)
            phrase = SYNTHETIC_PHRASES.get(kind, ["a defect"])[0]
            sents = list(kinds.get(kind, [phrase]))
            same = [d for d in defects if d["kind"] == kind]
            if len(same) == 1:  # where / how large only when it names one defect
                d = same[0]
                noun = phrase.split(" ", 1)[1]
                where = f"in the {d['position'].replace('-', ' ')} area"
                art = "an" if d["size"][0] in "aeiou" else "a"
                sents += [f"{phrase} {where} of the part", f"{art} {d['size']} {noun} {where}"]
            # every kind in the frame: none of them may serve as this sample's negative sentence
            out.append({"image": str(img_p), "mask": str(mask_p), "sentences": list(dict.fromkeys(sents)),
                        "kind": kind, "split": split, "present": sorted({d["kind"] for d in defects})})
        if len({d["kind"] for d in defects}) > 1:
            mask_p = out_dir / f"frame_{i:05d}_mask.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_p)
            out.append({"image": str(img_p), "mask": str(mask_p), "sentences": list(UNIVERSAL_PROMPTS),
                        "kind": "mixed", "split": split})
    line.close()
    return _doc("synthetic", seed, kinds, out)


BUILDERS = {"magnetic_tile": build_magnetic_tile, "kolektorsdd": build_kolektorsdd}


def shared_data_root() -> Path:
    """``../shared/data`` beside the repository root."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def save(doc: dict, path: Path | str) -> Path:
    """Write a referring data document as JSON (creating the folder). Relative image and mask
    paths (relative to the working directory, as builders make them) are rewritten relative to
    the JSON file's folder, which is how ``load`` reads them; absolute paths stay absolute."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    samples = []
    for s in doc.get("samples", []):
        s = dict(s)
        for key in ("image", "mask"):
            if s.get(key) and not Path(s[key]).is_absolute():
                s[key] = os.path.relpath(Path(s[key]).resolve(), base)
        samples.append(s)
    path.write_text(json.dumps({**doc, "samples": samples}, indent=1), encoding="utf-8")
    return path


def load(path_or_name: Path | str, seed: int = 0) -> dict:
    """A referring document from a JSON file, or built on the fly from a data set name
    (``magnetic_tile``, ``kolektorsdd``) found under ``../shared/data``. Validates it."""
    p = Path(path_or_name)
    if str(path_or_name) in BUILDERS and not p.exists():
        root = shared_data_root() / str(path_or_name)
        if not root.is_dir():
            raise FileNotFoundError(f"data set {path_or_name!r} not found at {root}")
        return validate(BUILDERS[str(path_or_name)](root, seed=seed), str(path_or_name))
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReferDataError(f"{p}: not valid JSON: {exc}") from None
    base = p.resolve().parent
    for s in doc.get("samples", []):
        for key in ("image", "mask"):
            if s.get(key) and not Path(s[key]).is_absolute():
                s[key] = str(base / s[key])
    return validate(doc, str(p))


def validate(doc: dict, where: str) -> dict:
    """Check the document's shape; raises ReferDataError naming the sample and key."""
    if doc.get("format") != FORMAT:
        raise ReferDataError(f"{where}: format must be {FORMAT!r}, got {doc.get('format')!r}")
    samples = doc.get("samples")
    if not isinstance(samples, list) or not samples:
        raise ReferDataError(f"{where}: 'samples' must be a non-empty list")
    for i, s in enumerate(samples):
        for key in ("image", "sentences", "kind", "split"):
            if key not in s:
                raise ReferDataError(f"{where}: samples[{i}] lacks {key!r}")
        if s["split"] not in SPLITS:
            raise ReferDataError(f"{where}: samples[{i}].split must be one of {SPLITS}, got {s['split']!r}")
        if not s["sentences"] or not all(isinstance(t, str) and t for t in s["sentences"]):
            raise ReferDataError(f"{where}: samples[{i}].sentences must be non-empty strings")
    doc.setdefault("universal_prompts", list(UNIVERSAL_PROMPTS))
    doc.setdefault("kind_sentences", {})
    return doc


@dataclass
class ReferItem:
    """One loaded sample: uint8 image H x W x 3 and bool mask H x W at the model's size."""

    image: np.ndarray
    mask: np.ndarray
    sentences: list[str]
    kind: str
    path: str
    present: tuple[str, ...] = ()  # every defect kind in the image (negatives must name none of them)

    @property
    def whole(self) -> bool:
        """The mask holds every defect of the image (not one kind's share of a frame with several):
        only then is it the target of the universal prompt."""
        return len(self.present) <= 1


def load_items(doc: dict, split: str, image_hw: tuple[int, int]) -> list[ReferItem]:
    """Load and resize every sample of ``split`` into memory."""
    h, w = image_hw
    items = []
    for s in doc["samples"]:
        if s["split"] != split:
            continue
        img = load_image(Path(s["image"]), channels=3)
        mask = load_mask(Path(s["mask"]) if s.get("mask") else None, img.shape[:2])
        img_r = resize_uint8(img, h, w)
        m = resize_uint8(mask.astype(np.uint8)[..., None] * 255, h, w)[..., 0] > 127
        items.append(ReferItem(img_r, m, list(s["sentences"]), s["kind"], s["image"], tuple(s.get("present", ()))))
    return items


def pick_sentence(item: ReferItem, rng: random.Random, kinds: dict[str, list[str]],
                  universal: list[str], universal_prob: float, negative_prob: float
                  ) -> tuple[str, bool]:
    """A training sentence for ``item`` and whether the target stays (False = empty target).

    With ``universal_prob`` a universal prompt (target kept; only on a sample whose mask is the
    image's whole defect area: one kind's share of a frame with several kinds would teach "any
    defect" to miss the others); with ``negative_prob`` a sentence of another kind (target
    emptied: the defect asked for is not there); else one of its own.
    """
    r = rng.random()
    if item.kind != "good" and r < universal_prob:
        if item.whole:
            return rng.choice(universal), True
        return rng.choice(item.sentences), True  # its own sentence instead: never a negative
    # a sample whose kind has no sentence list (e.g. "mixed") may hold any kind: no negatives
    others = ([k for k in kinds if k != item.kind and k not in item.present]
              if item.kind in kinds or item.kind == "good" else [])
    if others and r < universal_prob + negative_prob:
        return rng.choice(kinds[rng.choice(others)]), item.kind == "good"
    return rng.choice(item.sentences), True
