"""Throughput of the zero-shot engine's ``infer`` (tier 1) at daemon settings, per feature-extractor
backend, with the issue's floor method as a baseline, measured in the same process. Prints a table.

    .venv/bin/python bench/bench_engine.py [--frames 256] [--batch 4] [--refs 8] [--feature-dim 64]
        [--backends torch-eager,torch,onnxruntime] [--context-weights 0,1]

Backends: ``torch-eager`` (the backbone module as written), ``torch`` (traced and frozen: what
``backend = "torch"`` runs), ``onnxruntime`` (exported on first use into a temporary folder).
Only the feature extractor differs; scoring is the same code. ``--context-weights`` repeats each
backend per ``[engine] context_weight`` (0 = without the context level: the baseline row). Peak RSS is the process's, so it only
grows from row to row (``linewatch bench engines`` measures each backend in its own process).

Frames are synthetic 256 x 256 x 3 textures (a fixed seed), grouped in lots of ``--lot-size``;
every lot is closed (tier 2) outside the timed region, whose time is reported separately.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linewatch.config import ZeroShotEngine as EngineCfg  # noqa: E402
from linewatch.engines.zeroshot import TorchExtractor, ZeroShotEngine  # noqa: E402
from linewatch.evaluate import FloorBaseline  # noqa: E402
from linewatch.frames import FrameMeta  # noqa: E402


def frames(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Brushed-metal-like frames with a few bright scratches."""
    rng = np.random.default_rng(seed)
    base = np.cumsum(rng.normal(0, 1, (size, size)), axis=1)
    base = (base - base.min()) / (np.ptp(base) + 1e-9) * 80 + 90
    out = []
    for i in range(n):
        im = base + rng.normal(0, 4, (size, size))
        if i % 7 == 3:
            y = rng.integers(20, size - 20)
            im[y:y + 3, 30:size - 30] += 60
        out.append(np.repeat(np.clip(im, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_engine(cfg: EngineCfg, backend: str, engines_dir: Path) -> ZeroShotEngine:
    """The engine with the extractor of ``backend`` (see the module docstring)."""
    if backend == "torch-eager":
        return ZeroShotEngine(cfg, TorchExtractor(cfg.feature_dim, threads=cfg.threads, jit=False,
                                                  context=cfg.context_weight > 0))
    return ZeroShotEngine(cfg.model_copy(update={"backend": backend, "engines_dir": engines_dir}))


def bench_engine(cfg: EngineCfg, images: list[np.ndarray], batch: int, lot_size: int, backend: str = "torch",
                 engines_dir: Path = Path("engines")) -> dict:
    eng = make_engine(cfg, backend, engines_dir)
    eng.warmup(*images[0].shape)
    lat, t_lots, fid = [], [], 0
    t_all = 0.0
    for s in range(0, len(images), batch):
        chunk = images[s:s + batch]
        lot = f"lot{fid // lot_size}"
        metas = [FrameMeta(fid + i, time.time(), "bench", *im.shape[:2], lot_id=lot) for i, im in enumerate(chunk)]
        t0 = time.perf_counter()
        eng.infer(chunk, metas)
        dt = time.perf_counter() - t0
        lat.append(dt)
        t_all += dt
        fid += len(chunk)
        if fid % lot_size == 0:
            t0 = time.perf_counter()
            eng.lot_closed(lot)
            t_lots.append(time.perf_counter() - t0)
    lat_ms = np.asarray(lat) * 1000
    ctx = f", context {cfg.context_weight:g}" if cfg.context_weight > 0 else ""
    mem = f", memory {cfg.tier2_memory_frames}" if cfg.tier2_memory_frames else ""
    # lot close: the mean over the lots that closed with a full tier-2 memory (all lots without one)
    full = t_lots[math.ceil(cfg.tier2_memory_frames / lot_size):]
    return {"name": f"engine tier1 {backend} (d={cfg.feature_dim}, refs={cfg.reference_frames}{ctx}{mem})",
            "fps": len(images) / t_all, "p50": float(np.percentile(lat_ms, 50)),
            "p99": float(np.percentile(lat_ms, 99)), "rss": peak_rss_mb(),
            "lot_close_s": float(np.mean(full)) if full else float("nan"), "version": eng.version}


def bench_floor(images: list[np.ndarray], lot_size: int, threads: int) -> dict:
    floor = FloorBaseline(threads)
    floor.score_lot(images[:2])
    lat = []
    for s in range(0, len(images), lot_size):
        t0 = time.perf_counter()
        floor.score_lot(images[s:s + lot_size])
        lat.append(time.perf_counter() - t0)
    lat_ms = np.asarray(lat) * 1000
    return {"name": f"floor (whole lot of {lot_size}, d=152)", "fps": len(images) / sum(lat),
            "p50": float(np.percentile(lat_ms, 50)), "p99": float(np.percentile(lat_ms, 99)),
            "rss": peak_rss_mb(), "lot_close_s": float("nan"), "version": "floor"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--refs", type=int, default=8)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--lot-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--backends", default="torch", help="comma-separated: torch-eager, torch, onnxruntime")
    p.add_argument("--context-weights", default="0", help="comma-separated [engine] context_weight values")
    p.add_argument("--memory-frames", default="0",
                   help="comma-separated [engine] tier2_memory_frames values (lot close: the mean over the lots "
                        "closed with a full memory)")
    p.add_argument("--append", type=Path, default=None,
                   help="also append the table to this file (bench/RESULTS.md) under the engines heading")
    a = p.parse_args(argv)
    images = frames(a.frames, a.size)
    cfg = EngineCfg(threads=a.threads, feature_dim=a.feature_dim, reference_frames=a.refs, input_size=a.size)
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        rows = [bench_engine(cfg.model_copy(update={"context_weight": float(w), "tier2_memory_frames": int(m)}),
                             images, a.batch, a.lot_size, b.strip(), Path(tmp))
                for b in a.backends.split(",") if b.strip() for w in a.context_weights.split(",")
                for m in a.memory_frames.split(",")]
    if not a.no_floor:
        rows.append(bench_floor(images, a.lot_size, a.threads))
    print(f"\n{a.frames} frames {a.size}x{a.size}x3, batch {a.batch}, threads {a.threads}; latency per "
          f"engine call (a batch; a whole lot for the floor)")
    print(f"{'method':56s} {'frames/s':>9s} {'p50 ms':>9s} {'p99 ms':>9s} {'peak RSS MB':>12s} {'lot close s':>12s}")
    for r in rows:
        print(f"{r['name']:56s} {r['fps']:9.1f} {r['p50']:9.1f} {r['p99']:9.1f} {r['rss']:12.0f} "
              f"{r['lot_close_s']:12.2f}")
    print(f"engine version: {rows[0]['version']}")
    if a.append:
        append_engine_table(a, rows)
    return 0


def append_engine_table(a, rows: list[dict]) -> None:
    """The table as markdown, with date, machine and versions, into ``a.append``."""
    import datetime as dt
    import shlex

    from linewatch.benchmark import append_results, machine_line, versions_line

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    base = next((r["fps"] for r in rows if "torch-eager" in r["name"]), None)
    block = [f"### {now}: zero-shot engine tier 1 (`bench/bench_engine.py`)", "",
             f"- settings: {a.frames} frames {a.size}x{a.size}x3 in lots of {a.lot_size}, batch {a.batch}, "
             f"threads {a.threads}, feature_dim {a.feature_dim}, reference_frames {a.refs}; latency per infer call "
             f"(a batch); the whole engine (resize, features, mutual scoring), one process",
             f"- machine: {machine_line()}", f"- versions: {versions_line()}",
             f"- command: `{shlex.join(['.venv/bin/python', 'bench/bench_engine.py', *sys.argv[1:]])}`", "",
             "| engine | frames/s | p50 ms | p99 ms | peak RSS MB (cumulative) | lot close s | vs torch eager |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        speed = f"{r['fps'] / base:.2f}x" if base else "-"
        block.append(f"| {r['name']} | {r['fps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['rss']:.0f} | "
                     f"{r['lot_close_s']:.2f} | {speed} |")
    append_results(a.append, block)
    print(f"appended to {a.append}")


if __name__ == "__main__":
    raise SystemExit(main())
