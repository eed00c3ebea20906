"""``linewatch bench engines``: throughput and latency of every exportable model on every backend,
with torch eager measured in the same run as the baseline; prints a table and appends it to
``bench/RESULTS.md`` (under its own heading, with date, machine and versions).

Each (model, backend) pair runs in a fresh child process (spawn), so its peak RSS is its own and
one backend's thread pools or allocator do not slow the next. Per pair: warm-up, then timed calls
at batch 1 and at the configured batch (``inspect.batch_size``) for ``--seconds`` each (at least
``--min-calls`` calls). Latency is per call (a whole batch); frames/s = frames / total call time.

Backends: ``torch-eager`` (the baseline: the module as written), ``torch-jit`` (traced, frozen,
optimised: what ``backend = "torch"`` runs), ``onnxruntime`` (CPU EP, or CUDA EP with
``--device cuda``), ``tensorrt`` (FP16 plan; only where tensorrt, pycuda and a GPU exist; otherwise
reported as not run, with the reason).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import multiprocessing as mp
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("torch-eager", "torch-jit", "onnxruntime", "tensorrt")
RESULTS_HEADING = "## Engines (`linewatch bench engines`)"


# ------------------------------------------------------------------------------------- child side
def _make_runner(model: str, params: dict, backend: str, engines_dir: str, threads: int, device: str,
                 opt_batch: int):
    """A callable(batch) -> None running one forward pass of ``model`` on ``backend``."""
    import torch

    from .runtime.models import get_spec

    if threads > 0:
        torch.set_num_threads(threads)
    spec = get_spec(model)
    params = spec.resolve(params)
    if backend in ("torch-eager", "torch-jit"):
        module = spec.build(params).to(device)
        cache: dict[int, Any] = {}

        def inputs(batch: int):
            if batch not in cache:
                cache[batch] = tuple(t.to(device) for t in spec.example_inputs(module, params, batch))
            return cache[batch]

        fn = module
        if backend == "torch-jit":
            with torch.inference_mode():
                fn = torch.jit.optimize_for_inference(torch.jit.freeze(
                    torch.jit.trace(module, inputs(1), check_trace=False)))

        def run(batch: int) -> None:
            with torch.inference_mode():
                fn(*inputs(batch))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return run, {}

    from .runtime.export import ensure_onnx

    module = spec.build(params)
    np_cache: dict[int, dict[str, np.ndarray]] = {}

    def np_inputs(batch: int) -> dict[str, np.ndarray]:
        if batch not in np_cache:
            np_cache[batch] = {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs(module, params, batch))}
        return np_cache[batch]

    if backend == "onnxruntime":
        from .runtime.ort_backend import OrtRunner

        path, manifest = ensure_onnx(model, params, Path(engines_dir))
        runner = OrtRunner(path, device=device, threads=threads, manifest=manifest)
        return (lambda batch: runner.run(np_inputs(batch))), {"providers": ",".join(runner.providers)}
    if backend == "tensorrt":
        from .runtime.tensorrt_backend import TrtRunner, ensure_plan

        plan, fields = ensure_plan(model, params, Path(engines_dir), opt_batch=opt_batch, progress=False)
        runner = TrtRunner(plan, cuda_graphs=True)
        return (lambda batch: runner.run(np_inputs(batch))), {"device_mem_mb": runner.device_memory_bytes() / 2**20}
    raise ValueError(f"unknown backend {backend!r}")


def _child(job: dict, queue) -> None:
    """Measure one (model, backend) pair; put a result dict on ``queue``."""
    try:
        run, extra = _make_runner(job["model"], job["params"], job["backend"], job["engines_dir"], job["threads"],
                                  job["device"], job["batch"])
        rows = []
        for batch in sorted({1, job["batch"]}):
            for _ in range(job["warmup"]):
                run(batch)
            lat = []
            t_end = time.perf_counter() + job["seconds"]
            while time.perf_counter() < t_end or len(lat) < job["min_calls"]:
                t0 = time.perf_counter()
                run(batch)
                lat.append(time.perf_counter() - t0)
            rows.append({"batch": batch, "lat_s": lat})
        queue.put({"ok": True, "rows": rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   **extra})
    except Exception as exc:  # noqa: BLE001 - reported in the table as "failed: <reason>", never hidden
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


# ------------------------------------------------------------------------------------ parent side
def backend_unavailable(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot be measured on this machine (None when it can)."""
    if backend != "tensorrt":
        return None
    from .runtime import backend_problem

    problem = backend_problem("tensorrt")
    if problem:
        return problem
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA GPU"
    except Exception as exc:  # noqa: BLE001
        return f"CUDA driver unavailable ({exc})"
    return None


def measure(model: str, params: dict, backend: str, *, engines_dir: Path, batch: int, threads: int,
            device: str = "cpu", seconds: float = 5.0, min_calls: int = 5, warmup: int = 3,
            timeout_s: float = 1800) -> dict:
    """Run one (model, backend) measurement in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    job = {"model": model, "params": params, "backend": backend, "engines_dir": str(engines_dir), "batch": batch,
           "threads": threads, "device": device, "seconds": seconds, "min_calls": min_calls, "warmup": warmup}
    proc = ctx.Process(target=_child, args=(job, queue), name=f"bench-{model}-{backend}")
    proc.start()
    try:
        result = queue.get(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - queue.Empty or a dead child
        result = {"ok": False, "error": f"no result within {timeout_s:.0f} s (exit code {proc.exitcode})"}
    proc.join(10)
    if proc.is_alive():
        proc.kill()
    return result


def machine_line() -> str:
    """CPU model, cores, memory and GPU (if any), in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = float("nan")
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} CPU cores usable, {mem_gb:.0f} GiB RAM, {gpu}"


def versions_line() -> str:
    """Versions of the packages that decide the numbers."""
    from importlib import metadata

    parts = [f"python {platform.python_version()}"]
    for pkg in ("torch", "onnxruntime", "onnx", "tensorrt", "pycuda", "numpy"):
        try:
            parts.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            if pkg in ("tensorrt", "pycuda"):
                parts.append(f"{pkg} not installed")
    from . import __version__

    parts.append(f"linewatch {__version__}")
    return ", ".join(parts)


def summarize_rows(raw_rows: list[dict]) -> list[dict]:
    """Per batch: frames/s = frames / total call time, p50/p99 of the call latencies, pooled over
    all rounds of a (model, backend) pair."""
    by_batch: dict[int, list[float]] = {}
    for r in raw_rows:
        by_batch.setdefault(r["batch"], []).extend(r["lat_s"])
    out = []
    for batch, lat in sorted(by_batch.items()):
        ms = np.asarray(lat) * 1e3
        out.append({"batch": batch, "fps": batch * len(lat) / (ms.sum() / 1e3), "calls": len(lat),
                    "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))})
    return out


P99_MIN_SAMPLES = 100  # below this a p99 is about the slowest sample


def p99_cell(p99_ms: float, samples: int) -> str:
    """A p99 for a results table, marked ``~max`` when too few samples make it the slowest one."""
    return f"{p99_ms:.1f}" + ("" if samples >= P99_MIN_SAMPLES else " (~max)")


def format_table(results: list[dict]) -> list[str]:
    """Markdown table rows of the results (speed-up is against torch eager, same model and batch)."""
    base = {(r["model"], row["batch"]): row["fps"] for r in results if r["backend"] == "torch-eager" and r["ok"]
            for row in r["rows"]}
    lines = ["| model | backend | batch | frames/s | p50 ms | p99 ms | calls | peak RSS MB | vs torch eager |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['backend']} | - | - | - | - | - | - | not run: {r['error']} |")
            continue
        mem = f"{r['peak_rss_mb']:.0f}" + (f" (+{r['device_mem_mb']:.0f} GPU)" if "device_mem_mb" in r else "")
        for row in r["rows"]:
            b = base.get((r["model"], row["batch"]))
            speed = f"{row['fps'] / b:.2f}x" if b else "-"
            p99 = p99_cell(row["p99_ms"], row.get("calls", P99_MIN_SAMPLES))
            lines.append(f"| {r['model']} | {r['backend']} | {row['batch']} | {row['fps']:.1f} | {row['p50_ms']:.1f} | "
                         f"{p99} | {row.get('calls', '-')} | {mem} | {speed} |")
    return lines


def append_results(path: Path, block: list[str]) -> None:
    """Insert ``block`` at the end of this module's section of ``path`` (created when missing);
    other sections (a daemon benchmark, say) are left where they are."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else "# linewatch benchmark results\n"
    lines = text.rstrip("\n").split("\n")
    if RESULTS_HEADING not in lines:
        lines += ["", RESULTS_HEADING, ""]
    start = lines.index(RESULTS_HEADING)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    lines[end:end] = ["", *block]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``linewatch bench``."""
    sub = parser.add_subparsers(dest="bench_cmd", required=True)
    s = sub.add_parser("engines", help="models x backends: frames/s, p50/p99 latency, peak memory")
    s.add_argument("--config", "-c", default=os.environ.get("LINEWATCH_CONFIG", "config.toml"),
                   help="config whose [engine] (feature_dim, threads, device) and [inspect] batch_size are used")
    s.add_argument("--models", default="patch_features",
                   help="comma-separated registered models (patch_features = the zero-shot backbone; dqformer; ard)")
    s.add_argument("--backends", default=",".join(BACKENDS))
    s.add_argument("--size", type=int, default=256, help="square input size in pixels")
    s.add_argument("--batch", type=int, default=None, help="default: inspect.batch_size")
    s.add_argument("--threads", type=int, default=None, help="default: engine.threads (0 = all cores)")
    s.add_argument("--device", default=None, help="default: engine.device")
    s.add_argument("--seconds", type=float, default=5.0, help="timed seconds per backend, batch and round")
    s.add_argument("--rounds", type=int, default=2,
                   help="the backends are measured in turn this many times and the calls pooled, so a "
                        "load change on a shared machine hits every backend alike")
    s.add_argument("--min-calls", type=int, default=5)
    s.add_argument("--engines-dir", type=Path, default=None, help="default: a temporary folder")
    s.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    s.add_argument("--no-append", action="store_true", help="print only; do not touch RESULTS.md")
    s.add_argument("--note", default="", help="a line added to the RESULTS.md entry")


def model_params(model: str, engine_cfg, size: int) -> dict:
    """Benchmark parameters of a registered model at ``size`` pixels."""
    if model == "patch_features":
        return {"feature_dim": int(getattr(engine_cfg, "feature_dim", 0)), "input_size": size}
    if model == "dqformer":
        return {"input_size": size}
    if model == "ard":
        dim = int(getattr(engine_cfg, "feature_dim", 0))
        return {"input_size": size, "feat_dim": dim or 152}
    return {}


def run(args) -> int:
    """Entry point of ``linewatch bench``."""
    from .config import Config, load_or_report

    if Path(args.config).is_file():
        cfg = load_or_report(args.config)
        if cfg is None:
            return 1
    else:
        print(f"linewatch bench: {args.config} not found; using the built-in defaults", file=sys.stderr)
        cfg = Config()
    eng = cfg.engine
    batch = args.batch or cfg.inspect.batch_size
    threads = args.threads if args.threads is not None else int(getattr(eng, "threads", 0))
    device = args.device or getattr(eng, "device", "cpu")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        print(f"linewatch bench: unknown backends {unknown}; choose from {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="linewatch-bench-") as tmp:
        engines_dir = args.engines_dir or Path(tmp)
        pairs: dict[tuple[str, str], dict] = {}
        for rnd in range(max(1, args.rounds)):
            for model in models:
                params = model_params(model, eng, args.size)
                for backend in backends:
                    key = (model, backend)
                    if key in pairs and not pairs[key]["ok"]:
                        continue
                    why = backend_unavailable(backend, device)
                    if why:
                        pairs[key] = {"model": model, "backend": backend, "ok": False, "error": why}
                        continue
                    print(f"... round {rnd + 1}: {model} on {backend}", file=sys.stderr, flush=True)
                    r = measure(model, params, backend, engines_dir=engines_dir, batch=batch, threads=threads,
                                device=device, seconds=args.seconds, min_calls=args.min_calls)
                    if not r["ok"]:
                        pairs[key] = {"model": model, "backend": backend, **r}
                        continue
                    acc = pairs.setdefault(key, {"model": model, "backend": backend, "ok": True, "raw": [],
                                                 "peak_rss_mb": 0.0})
                    acc["raw"] += r.pop("rows")
                    acc["peak_rss_mb"] = max(acc["peak_rss_mb"], r.pop("peak_rss_mb"))
                    acc.update({k: v for k, v in r.items() if k != "ok"})
        results = []
        for r in pairs.values():
            if r["ok"]:
                r["rows"] = summarize_rows(r.pop("raw"))
            results.append(r)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"{now}: input {args.size}x{args.size}, batch 1 and {batch}, threads {threads or 'all'}, device {device}, "
            f"{args.seconds:g} s timed per backend and batch, {max(1, args.rounds)} interleaved round(s) pooled; "
            f"peak RSS = the measuring child process's")
    table = format_table(results)
    print(f"\n{head}\nmachine: {machine_line()}\nversions: {versions_line()}\n")
    print("\n".join(table))
    if not args.no_append:
        block = [f"### {now}", "", f"- settings: {head[len(now) + 2:]}", f"- machine: {machine_line()}",
                 f"- versions: {versions_line()}",
                 f"- command: `{shlex.join(['linewatch', *sys.argv[1:]])}`"]
        if args.note:
            block.append(f"- note: {args.note}")
        block += ["", *table]
        append_results(args.results, block)
        print(f"\nappended to {args.results}")
    return 0 if all(r["ok"] or r["backend"] == "tensorrt" for r in results) else 1
