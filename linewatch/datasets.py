"""Image folder layouts with ground truth: listing samples and grouping them into lots.

Layouts understood (detected automatically):
- ``kolektor``: ``<item>/PartK.jpg`` + ``<item>/PartK_mask.png`` (one item = one lot)
- ``kinds``: ``<kind>/<name>.jpg`` + ``<kind>/<name>_mask.png``; kind ``free`` / ``good`` is
  defect-free (magnetic_tile)
- ``mvtec``: ``<category>/test/<kind>/<name>.png`` + ``<category>/ground_truth/<kind>/<name>_mask.png``
  (or the same rooted at one category); kind ``good`` is defect-free
- ``flat``: images in one folder, no ground truth
"""

from __future__ import annotations

import functools
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
GOOD_KINDS = {"free", "good", "ok", "normal"}


def image_key(path: Path | str) -> tuple[str, str]:
    """How a training image is recognised in an evaluated data set: its folder and file name (the
    data set may be a copy in another place). Unique within magnetic_tile, KolektorSDD and the
    synthetic line; across MVTec categories (``test/good/000.png`` in each) it is not, so frames
    of another category with a training image's name are left out too (never a leak, fewer frames)."""
    p = Path(path)
    return p.parent.name, p.name


@dataclass(frozen=True, slots=True)
class Sample:
    """One image with its ground truth. ``mask`` is None for a defect-free image or no GT."""

    image: Path
    mask: Path | None
    kind: str  # defect kind, or "good"
    group: str  # natural group (kolektor item, mvtec category, kinds-layout root)
    has_gt: bool  # whether ground truth is known at all (False for the flat layout)

    @property
    def defective(self) -> bool:
        return self.kind != "good"


MASK_SUFFIXES = ("_mask", "_label")  # <stem>_mask.png (these data sets), <stem>_label.bmp (KolektorSDD's own)


def _is_image(p: Path) -> bool:
    """An image file that is not a mask: ``<stem>_mask.*`` never is one, in any letter case, nor
    is ``<stem>_label.*`` beside its image ``<stem>.*``."""
    if p.suffix.lower() not in IMAGE_EXT:
        return False
    stem = p.stem.lower()
    if stem.endswith("_mask"):
        return False
    if stem.endswith("_label"):
        base = p.stem[:-len("_label")]
        return not any(q.suffix.lower() in IMAGE_EXT for q in p.parent.glob(base + ".*") if q != p)
    return True


def find_mask(image: Path) -> Path | None:
    """The mask file beside ``image``: ``<stem>_mask`` or ``<stem>_label`` with any image
    extension, in any letter case (so a Linux box finds ``Part1_mask.PNG`` as Windows would);
    ``<stem>_mask.png`` first. None when there is none."""
    exact = image.with_name(image.stem + "_mask.png")
    if exact.is_file():
        return exact
    want = {(image.stem + suffix).lower() for suffix in MASK_SUFFIXES}
    found = sorted(p for p in _mask_files(image.parent) if p.stem.lower() in want)
    return found[0] if found else None


@functools.lru_cache(maxsize=64)
def _mask_files(folder: Path) -> tuple[Path, ...]:
    """The mask-like files of a folder, listed once per folder (not once per image)."""
    return tuple(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT
                 and p.stem.lower().endswith(MASK_SUFFIXES) and p.is_file())


def _natural_key(p: Path) -> tuple:
    """Natural order (``img2`` before ``img10``), ties (``img01``, ``img1``) broken by the name
    itself, so the order never depends on the file system's listing order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))], str(p)


def detect_layout(root: Path) -> str:
    root = Path(root)
    subdirs = sorted((d for d in root.iterdir() if d.is_dir()), key=_natural_key)
    if any(_is_image(p) for p in root.iterdir() if p.is_file()):
        # images at the top: a flat folder, whatever its subfolders hold (a rejects/ folder of a
        # recording must not turn it into a layout that leaves the top-level images out)
        if any(_is_image(p) for d in subdirs for p in d.iterdir()):
            logger.warning("%s holds images and subfolders with images: read as a flat folder, "
                           "the subfolders are left out", root)
        return "flat"
    if (root / "test").is_dir() or any((d / "test").is_dir() for d in subdirs):
        return "mvtec"
    if subdirs and any(re.fullmatch(r"Part\d+", p.stem) for d in subdirs[:3] for p in d.iterdir()):
        return "kolektor"
    if subdirs and any(_is_image(p) for d in subdirs for p in d.iterdir()):
        return "kinds"
    return "flat"


def list_samples(root: Path | str, layout: str = "auto") -> list[Sample]:
    """Every image under ``root`` with its mask, in a stable (natural-sorted) order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    _mask_files.cache_clear()  # a folder listed earlier may have changed
    layout = detect_layout(root) if layout == "auto" else layout
    out: list[Sample] = []
    if layout == "kolektor":
        for item in sorted((d for d in root.iterdir() if d.is_dir()), key=_natural_key):
            for img in sorted(filter(_is_image, item.iterdir()), key=_natural_key):
                m = find_mask(img)
                defective = m is not None and _mask_nonzero(m)
                out.append(Sample(img, m if defective else None, "defect" if defective else "good",
                                  item.name, True))
    elif layout == "kinds":
        for kd in sorted((d for d in root.iterdir() if d.is_dir()), key=_natural_key):
            good = kd.name.lower() in GOOD_KINDS
            for img in sorted(filter(_is_image, kd.iterdir()), key=_natural_key):
                m = find_mask(img)
                has_mask = m is not None and not good
                out.append(Sample(img, m if has_mask else None, "good" if good else kd.name,
                                  root.name, True))
    elif layout == "mvtec":
        cats = [root] if (root / "test").is_dir() else sorted(d for d in root.iterdir() if (d / "test").is_dir())
        for cat in cats:
            for kd in sorted((d for d in (cat / "test").iterdir() if d.is_dir()), key=_natural_key):
                good = kd.name.lower() in GOOD_KINDS
                for img in sorted(filter(_is_image, kd.iterdir()), key=_natural_key):
                    m = cat / "ground_truth" / kd.name / (img.stem + "_mask.png")
                    out.append(Sample(img, m if (not good and m.exists()) else None,
                                      "good" if good else kd.name, cat.name, True))
    elif layout == "flat":
        for img in sorted(filter(_is_image, root.iterdir()), key=_natural_key):
            out.append(Sample(img, None, "good", root.name, False))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if not out:
        raise FileNotFoundError(f"no images found under {root} (layout {layout})")
    return out


def mask_pixels(im: Image.Image) -> np.ndarray:
    """The marked pixels of a mask image, bool H x W. A mask of 0/1 values (8- or 16-bit) is
    marked where it is not 0; an 8-bit one where it is above 127 (0/255 masks, with JPEG noise or
    smoothed edges); a 16-bit one above half its peak (0/65535, or 12-bit 0/4095 in a 16-bit
    file). A colour or palette mask counts the brightest channel of its colours, so a pure red
    mark is marked."""
    if im.mode in ("P", "PA"):  # palette indices say nothing: their colours do
        im = im.convert("RGB")
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    if arr.dtype == bool:
        return arr.copy()
    peak = int(arr.max()) if arr.size else 0
    if peak <= 1:
        return arr > 0
    if arr.dtype.itemsize >= 2 and peak > 255:  # a lossless 16-bit mask: two levels, split between them
        return arr > peak / 2
    return arr > 127.5


def _mask_nonzero(path: Path) -> bool:
    """Whether the mask marks any pixel, by the rule the ground truth is read with (``load_mask``)."""
    with Image.open(path) as im:
        return bool(mask_pixels(im).any())


def group_lots(samples: list[Sample], mode: str = "group", lot_size: int = 32,
               shuffle_seed: int | None = None) -> list[list[Sample]]:
    """Split samples into lots: ``group`` = one lot per natural group (a kolektor item),
    ``size`` = consecutive lots of ``lot_size`` after an optional fixed shuffle."""
    items = list(samples)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    if mode == "group":
        lots: dict[str, list[Sample]] = {}
        for s in items:
            lots.setdefault(s.group, []).append(s)
        return list(lots.values())
    if mode == "size":
        return [items[i:i + lot_size] for i in range(0, len(items), lot_size)]
    raise ValueError(f"unknown lot mode {mode!r}")


def magnetic_tile_lots(samples: list[Sample], lot_size: int = 32, defect_fraction: float = 0.1,
                       seed: int = 0) -> list[list[Sample]]:
    """Lots of ``lot_size`` with about ``defect_fraction`` defective images, in a fixed shuffled
    order (the evaluation protocol for the kinds layout, where most images are defect-free)."""
    rng = random.Random(seed)
    good = [s for s in samples if not s.defective]
    bad = [s for s in samples if s.defective]
    rng.shuffle(good)
    rng.shuffle(bad)
    n_bad = max(1, round(lot_size * defect_fraction))
    n_good = lot_size - n_bad
    lots = []
    while len(good) >= n_good and len(bad) >= n_bad:
        lot = [good.pop() for _ in range(n_good)] + [bad.pop() for _ in range(n_bad)]
        rng.shuffle(lot)
        lots.append(lot)
    return lots


def load_image(path: Path, channels: int = 3, bit_depth: int = 0) -> np.ndarray:
    """Read an image as uint8 HxWxC. Raises ValueError for a corrupt or unreadable file (a
    header claiming a huge size included). A grey image of more than 8 bits (a Mono10/12/16
    recording) is scaled to 8 bits by :func:`to_8bit` with ``bit_depth`` significant bits (0:
    the file's own depth), not clipped."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                im = Image.fromarray(to_8bit(np.asarray(im), bit_depth), "L")
            arr = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from None
    return arr if arr.ndim == 3 else arr[..., None]


def to_8bit(arr: np.ndarray, bit_depth: int = 0) -> np.ndarray:
    """Grey values of more than 8 bits as uint8, at one fixed scale for every frame of a
    recording: ``bit_depth`` significant bits (12 for Mono12 data kept in 16-bit files) or, with
    0, 16 bits (what a 16-bit PNG or TIFF holds, whether Pillow reads it as I;16 or as 32-bit I;
    a float image counts 0..1)."""
    if bit_depth:
        full = 2.0 ** bit_depth - 1
    elif arr.dtype.kind == "f":
        full = 1.0
    else:
        full = 2.0 ** 16 - 1
    a = np.nan_to_num(np.asarray(arr, dtype=np.float64), nan=0.0, posinf=full, neginf=0.0)
    return np.round(a * (255.0 / full)).clip(0, 255).astype(np.uint8)


def load_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool HxW (all False when ``path`` is None). A mask of another size
    than its image is an error (a transposed mask or another image's would give plausible but
    misaligned ground truth); for an image resized after loading, ``resize_mask`` the mask."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    with Image.open(path) as im:
        m = mask_pixels(im)
    if m.shape != tuple(shape):
        raise ValueError(f"mask {path} is {m.shape[1]}x{m.shape[0]}, its image {shape[1]}x{shape[0]}")
    return m


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to ``shape`` (H, W), nearest neighbour."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)) > 127
