"""`linewatch synth OUT`: write the synthetic line to disk as labelled lots, so that `linewatch
eval` and `linewatch replay` see exactly the frames and masks the daemon's default source makes.

Layout (the kolektor layout of ``linewatch.datasets``): ``OUT/lot0001/Part0.png`` with
``Part0_mask.png`` (0/255), one folder per lot of ``--lot-size`` consecutive frames, in line order.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import Config, SyntheticSource, load_or_report
from . import create_source


def export(src_cfg: SyntheticSource, out: Path, n_frames: int, lot_size: int) -> dict[str, int]:
    """Render ``n_frames`` of the line into ``out``; returns counts (frames, defective, lots)."""
    src = create_source(src_cfg.model_copy(update={"fps": 0.0, "n_frames": n_frames}))
    src.open()
    counts = {"frames": 0, "defective": 0, "lots": 0}
    try:
        for sf in src.frames(threading.Event()):
            i = sf.meta.frame_id
            folder = out / f"lot{i // lot_size + 1:04d}"
            if i % lot_size == 0:
                folder.mkdir(parents=True, exist_ok=True)
                counts["lots"] += 1
            image = sf.image[..., 0] if sf.image.shape[2] == 1 else sf.image
            Image.fromarray(image).save(folder / f"Part{i % lot_size}.png")
            mask = sf.gt if sf.gt is not None else np.zeros(image.shape[:2], bool)
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"Part{i % lot_size}_mask.png")
            counts["frames"] += 1
            counts["defective"] += int(mask.any())
    finally:
        src.close()
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="folder to write (created; must be empty or absent)")
    parser.add_argument("--config", "-c", type=Path, default=None,
                        help="take [source] (if synthetic) and [lots] part_count from this config")
    parser.add_argument("--frames", type=_positive, default=256, help="frames to write (at least 1)")
    parser.add_argument("--lot-size", type=_positive, default=None, help="frames per lot (default: lots.part_count)")


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1 (0 frames would be the source's 'run forever')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    cfg = load_or_report(args.config) if args.config else Config()
    if cfg is None:
        return 1
    src = cfg.source if isinstance(cfg.source, SyntheticSource) else SyntheticSource()
    if args.out.exists() and any(args.out.iterdir()):
        print(f"linewatch synth: {args.out} is not empty", file=sys.stderr)
        return 1
    lot_size = args.lot_size if args.lot_size is not None else cfg.lots.part_count
    counts = export(src, args.out, args.frames, lot_size)
    print(f"{args.out}: {counts['frames']} frames ({counts['defective']} defective) in {counts['lots']} lots "
          f"of {lot_size}; evaluate with: linewatch eval {args.out} --layout kolektor --lots group")
    return 0
