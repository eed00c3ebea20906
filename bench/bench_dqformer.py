"""Throughput of the DQFormer engine's ``infer`` (tier 1: image-aware prompts, sentence encoding,
segmentation, region scoring) per backend, on real magnetic_tile frames, with torch as the
baseline measured in the same process. Prints a table.

    .venv/bin/python bench/bench_dqformer.py [--checkpoint var/dqformer/mt256/last.pt]
        [--frames 96] [--batch 4] [--threads 2] [--backends torch,onnxruntime] [--rounds 2]

Without ``--checkpoint`` a seeded, untrained DQFormer of the default architecture (256 x 256) is
written to a temporary folder: the speed does not depend on the weights. ``onnxruntime`` exports
the checkpoint into a temporary engines folder first (outside the timed region). Backends are
measured in turn, ``--rounds`` times, and the calls pooled, so a machine that slows down during
the run slows every backend alike. Frames keep their own sizes (the engine resizes them). Peak
RSS is the process's, read after each backend started (so it includes the ones before it).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linewatch.config import DQFormerEngine as EngineCfg  # noqa: E402
from linewatch.engines.dqformer import DQFormerEngine  # noqa: E402
from linewatch.frames import FrameMeta  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def real_frames(n: int) -> list[np.ndarray]:
    """``n`` magnetic_tile frames, every kind in turn (grey, their own sizes)."""
    from linewatch.datasets import load_image

    kinds = sorted(p for p in DATA.iterdir() if p.is_dir())
    paths = [sorted(k.glob("*.jpg")) for k in kinds]
    out, i = [], 0
    while len(out) < n:
        for ps in paths:
            if i < len(ps) and len(out) < n:
                out.append(load_image(ps[i], channels=1))
        i += 1
    return out


def seeded_checkpoint(folder: Path) -> Path:
    from linewatch.models.dqformer import DQFormer, DQFormerConfig, save_checkpoint
    from linewatch.models.text import TEXT_MODEL_NAME

    torch.manual_seed(0)
    path = folder / "seeded" / "last.pt"
    save_checkpoint(path, DQFormer(DQFormerConfig()).eval(), TEXT_MODEL_NAME, {}, epoch=0)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_calls(eng: DQFormerEngine, images: list[np.ndarray], batch: int) -> list[tuple[float, int]]:
    """(seconds, frames) of each ``infer`` call over ``images``."""
    out = []
    for s in range(0, len(images), batch):
        chunk = images[s:s + batch]
        metas = [FrameMeta(s + i, time.time(), "bench", *im.shape[:2]) for i, im in enumerate(chunk)]
        t0 = time.perf_counter()
        eng.infer(chunk, metas)
        out.append((time.perf_counter() - t0, len(chunk)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backends", default="torch,onnxruntime", help="comma-separated: torch, onnxruntime, tensorrt")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"magnetic_tile not found at {DATA}", file=sys.stderr)
        return 1
    images = real_frames(a.frames)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-dqformer-") as tmp:
        ckpt = a.checkpoint or seeded_checkpoint(Path(tmp))
        engines, rss = {}, {}
        for b in backends:
            t0 = time.perf_counter()
            engines[b] = DQFormerEngine(EngineCfg(checkpoint=ckpt, backend=b, threads=a.threads, device=a.device,
                                                  engines_dir=Path(tmp) / "engines"))
            engines[b].warmup(*images[0].shape[:2], 1)
            engines[b].infer(images[:a.batch], [FrameMeta(i, 0.0, "warm", *im.shape[:2])
                                                 for i, im in enumerate(images[:a.batch])])
            rss[b] = (peak_rss_mb(), time.perf_counter() - t0)
        calls: dict[str, list[tuple[float, int]]] = {b: [] for b in backends}
        for _ in range(a.rounds):
            for b in backends:
                calls[b] += timed_calls(engines[b], images, a.batch)
    print(f"\nDQFormer engine tier 1 on {a.frames} real magnetic_tile frames (own sizes), batch {a.batch}, "
          f"threads {a.threads}, {a.rounds} rounds pooled; checkpoint {a.checkpoint or 'seeded, untrained'}; "
          f"latency per infer call")
    print(f"{'backend':14s} {'frames/s':>9s} {'p50 ms':>9s} {'p99 ms':>9s} {'peak RSS MB*':>12s} "
          f"{'start s':>8s} {'vs torch':>9s}  version")
    base = None
    for b in backends:
        secs = np.array([c[0] for c in calls[b]])
        fps = sum(c[1] for c in calls[b]) / secs.sum()
        base = fps if b == "torch" else base
        speed = f"{fps / base:.2f}x" if base else "-"
        print(f"{b:14s} {fps:9.1f} {np.percentile(secs, 50) * 1e3:9.1f} {np.percentile(secs, 99) * 1e3:9.1f} "
              f"{rss[b][0]:12.0f} {rss[b][1]:8.1f} {speed:>9s}  {engines[b].version}")
    print("* the process's peak after that backend started: it includes the backends above it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
