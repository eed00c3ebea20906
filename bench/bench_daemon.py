"""Full-daemon benchmark: the shipped config.toml on the synthetic line, every stage real
(ring, lots, engine, tier 2, ZeroMQ PUB with a live SUB, SQLite), measured against the
baseline "engine alone" (``engine.infer`` on the same frames and batch size, no daemon) in the
same process. Prints a table; ``--append`` adds it to bench/RESULTS.md.

    .venv/bin/python bench/bench_daemon.py [--frames 300] [--rate 25] [--backend torch|onnxruntime]

Rows:
- ``engine alone``: frames/s of ``infer`` in a loop (the ceiling the daemon can reach); its
  latency is per engine call (a batch), over the calls;
- ``daemon, max rate``: the source as fast as the ring takes frames (policy block, no drops):
  sustained frames/s from first capture to last publish;
- ``daemon, paced``: the source at ``--rate`` frames/s with the shipped ring policy:
  capture-to-publish latency p50/p99 (``t_publish - t_capture`` as the subscriber receives it).
Only frames the engine judged (OK / NG) count as inspected; FAULT frames (a deadline overrun, an
engine error) are their own column and make the exit code 1. ``samples`` is how many latencies
the percentiles come from; a p99 of fewer than 100 is marked ``~max``.
Overhead per frame is the CPU time (``time.thread_time`` of each stage's thread) the daemon spends
on a frame besides the engine call: acquire put and lot assignment, ring, decisions and regions,
PNG and JSON encoding and sending, SQL writes, summed over threads. CPU time rather than wall time,
because on 2 cores a stage's wall time mostly measures waiting for the GIL and the engine's threads.
Tier 2 (the lot closer) is engine work and is not counted.
Memory is the process's peak RSS. No row counts a frame twice or misses one: ``unaccounted`` is
frames produced minus distinct frame ids answered on the wire.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from linewatch import config as cfgmod  # noqa: E402
from linewatch.acquire import create_source  # noqa: E402
from linewatch.benchmark import p99_cell  # noqa: E402
from linewatch.daemon import Daemon  # noqa: E402
from linewatch.engines import create_engine  # noqa: E402


def bench_config(tmp: Path, backend: str, size: int, fps: float, n: int, policy: str | None,
                 config: Path = ROOT / "config.toml"):
    base = cfgmod.load(config)
    src = base.source.model_copy(update={"kind": "synthetic", "width": size, "height": size, "fps": fps,
                                         "n_frames": n})
    if not isinstance(base.source, cfgmod.SyntheticSource):
        src = cfgmod.SyntheticSource(width=size, height=size, fps=fps, n_frames=n)
    update = {
        "source": src,
        "engine": base.engine.model_copy(update={"backend": backend}),
        "publish": base.publish.model_copy(update={"endpoint": f"ipc://{tmp}/pub",
                                                   "control_endpoint": f"ipc://{tmp}/ctl"}),
        "store": base.store.model_copy(update={"url": f"sqlite:///{tmp}/bench.db", "spool_dir": tmp / "spool"}),
        "metrics": base.metrics.model_copy(update={"port": 0}),
    }
    if policy is not None:  # the capacity run: nothing dropped, no deadline, every frame inspected
        update["ring"] = base.ring.model_copy(update={"policy": policy, "block_timeout_s": 60.0})
        update["inspect"] = base.inspect.model_copy(update={"deadline_ms": 0.0})
    return base.model_copy(update=update)


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else float("nan")


def engine_alone(cfg, n: int) -> dict:
    """The baseline: the engine the daemon would build, fed the same synthetic frames in batches."""
    src = create_source(cfg.source.model_copy(update={"fps": 0.0, "n_frames": n}))
    src.open()
    stop = threading.Event()
    frames = [(f.image.copy(), f.meta) for f in src.frames(stop)]
    src.close()
    engine = create_engine(cfg.engine, batch_size=cfg.inspect.batch_size)
    engine.warmup(src.height, src.width, src.channels)
    lot = cfg.lots.part_count
    batch = cfg.inspect.batch_size
    calls, t_engine = [], 0.0
    for i, (_, meta) in enumerate(frames):
        meta.lot_id = f"lot{i // lot}"
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        chunk = frames[s:s + batch]
        t1 = time.perf_counter()
        engine.infer([im for im, _ in chunk], [m for _, m in chunk])
        dt_s = time.perf_counter() - t1
        t_engine += dt_s
        calls.append(dt_s)
        if (s + batch) % lot < batch:
            engine.lot_closed(f"lot{s // lot}")  # outside the timed infer, like the lot closer thread
    wall = time.perf_counter() - t0
    engine.close()
    # percentiles over the calls, not over frames (a batch's time counted once per frame would make
    # the p99 of 75 calls its slowest call four times over)
    return {"fps": n / t_engine, "p50": percentile_ms(calls, 50), "p99": percentile_ms(calls, 99),
            "samples": len(calls), "faults": 0, "overhead_ms": float("nan"), "unaccounted": 0, "dropped": 0,
            "wall_s": wall}


def daemon_run(cfg, n: int) -> dict:
    """Run the daemon to the end of the synthetic source with a live subscriber."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, f"linewatch.{cfg.daemon.line}.frame".encode())
    sub.connect(cfg.publish.endpoint)
    daemon = Daemon(cfg, None, exit_at_source_end=True, install_signals=False)
    rows: list[tuple[int, int, float, float, str, str]] = []

    def collect() -> None:
        while not (daemon.stopped.is_set() and not sub.poll(300)):
            if sub.poll(100):
                h = json.loads(sub.recv_multipart()[1])
                rows.append((h["frame_id"], h["tier"], h["t_capture"], h["t_publish"], h["reason"], h["verdict"]))

    t = threading.Thread(target=collect, name="bench-sub")
    t.start()
    daemon.run()
    t.join()
    sub.close(linger=0)
    ctx.term()
    tier1 = [r for r in rows if r[1] == 1]
    ids = {r[0] for r in tier1}
    # inspected: judged by the engine (OK / NG, or held while the threshold calibrates); a FAULT
    # (deadline overrun, engine error) or a NOT_INSPECTED frame is not throughput
    inspected = [r for r in tier1 if r[5] in ("OK", "NG") or r[4] == "threshold calibrating"]
    faults = sum(1 for r in tier1 if r[5] == "FAULT")
    span = max(r[3] for r in tier1) - min(r[2] for r in tier1)
    ins = daemon.inspector
    stages = {"acquire put": daemon.acq_cpu_s, "inspector besides engine": ins.cpu_s - ins.engine_cpu_s,
              "publisher": daemon.publisher.cpu_s, "store writer": daemon.store.cpu_s}
    overhead = sum(stages.values())
    lat = [r[3] - r[2] for r in inspected]
    return {"fps": len(inspected) / span, "p50": percentile_ms(lat, 50), "p99": percentile_ms(lat, 99),
            "samples": len(lat), "faults": faults,
            "overhead_ms": 1000.0 * overhead / max(1, len(tier1)), "unaccounted": n - len(ids),
            "duplicates": len(tier1) - len(ids), "dropped": sum(daemon.ring.drops.values()),
            "engine_ms": 1000.0 * ins.engine_s / max(1, ins.inspected), "wall_s": span,
            "tier2_lots": daemon.closer.refined_lots,
            "stages_ms": {k: 1000.0 * v / max(1, len(tier1)) for k, v in stages.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--rate", type=float, default=25.0, help="source frames/s of the paced run")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"])
    ap.add_argument("--config", type=Path, default=ROOT / "config.toml",
                    help="config whose sections are used (source, endpoints and store are replaced)")
    ap.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp_s:
        tmp = Path(tmp_s)
        cfg = bench_config(tmp / "a", args.backend, args.size, 0.0, args.frames, "block", args.config)
        (tmp / "a").mkdir()
        results["engine alone (baseline)"] = engine_alone(cfg, args.frames)
        results["daemon, max rate (ring: block)"] = daemon_run(cfg, args.frames)
        (tmp / "b").mkdir()
        paced = bench_config(tmp / "b", args.backend, args.size, args.rate, args.frames, None, args.config)
        results[f"daemon, paced {args.rate:g} fps (ring: {paced.ring.policy})"] = daemon_run(paced, args.frames)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    head = (f"daemon benchmark, {dt.date.today().isoformat()}, {platform.node() or 'host'}: "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, backend {args.backend}, synthetic {args.size}x{args.size}x3, "
            f"{args.frames} frames per row, {args.config.name} (engine {cfg.engine.kind}, batch "
            f"{cfg.inspect.batch_size}, lots of {cfg.lots.part_count}"
            + (f", tier 2: {cfg.engine.tier2_references} references, stride {cfg.engine.tier2_ref_stride})"
               if cfg.engine.kind == "zeroshot" else ")"))
    lines = [head, "",
             "| run | frames/s | latency p50 ms | latency p99 ms | samples | overhead ms/frame | dropped | FAULT | unaccounted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lat_note = "" if "daemon" in name else " (engine call)"
        p99 = p99_cell(r["p99"], r["samples"])
        lines.append(f"| {name} | {r['fps']:.1f} | {r['p50']:.1f}{lat_note} | {p99}{lat_note} | {r['samples']} | "
                     f"{r['overhead_ms']:.3f} | {r['dropped']} | {r['faults']} | {r['unaccounted']} |")
    lines += [""] + [f"overhead by stage, {name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in r["stages_ms"].items())
                     for name, r in results.items() if "stages_ms" in r]
    lines += ["", f"peak RSS of the process: {rss_mb:.0f} MB"]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write("\n### " + text + "\n")
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if left:
        print(f"threads still running at exit: {left}", file=sys.stderr)
    bad = [n for n, r in results.items() if r["unaccounted"] or r.get("duplicates")]
    if bad:
        print(f"FRAMES UNACCOUNTED in: {bad}", file=sys.stderr)
        return 1
    faulted = [n for n, r in results.items() if r["faults"]]
    if faulted:
        print(f"FAULT frames in: {faulted} (not counted as inspected)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
