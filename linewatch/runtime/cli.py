"""``linewatch engines export | build | list``: ONNX export, TensorRT plan building, artifact status.

By default the model the config's ``[engine]`` section uses is exported / built (the zero-shot
backbone at the configured ``input_size`` and ``feature_dim``, or the DQFormer checkpoint);
``--model NAME [--param key=value ...]`` picks any registered model instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``linewatch engines``."""
    import os

    sub = parser.add_subparsers(dest="engines_cmd", required=True)
    for name, help_ in (("export", "export ONNX files (+ manifests) into engines_dir"),
                        ("build", "build TensorRT plans from the ONNX files (needs the gpu extra)"),
                        ("list", "list the artifacts in engines_dir and whether they are current")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", "-c", default=os.environ.get("LINEWATCH_CONFIG", "config.toml"))
        s.add_argument("--engines-dir", type=Path, default=None, help="override engine.engines_dir")
        if name == "list":
            continue
        s.add_argument("--model", default=None, help="a registered model instead of the config's engine")
        s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="export parameter of --model (value parsed as JSON, else a string)")
        s.add_argument("--force", action="store_true", help="export / build even when current")
        if name == "build":
            s.add_argument("--precision", default="fp16", choices=["fp16", "int8", "fp32"])
            s.add_argument("--calibration", type=Path, default=None,
                           help="replay folder of frames for INT8 calibration")
            s.add_argument("--opt-batch", type=int, default=None, help="default: inspect.batch_size")
            s.add_argument("--max-batch", type=int, default=16)
            s.add_argument("--no-progress", action="store_true")


def _parse_params(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def config_models(engine_cfg) -> list[tuple[str, dict]]:
    """(model, params) the config's engine section needs exported."""
    from .models import dqformer_params, zeroshot_params

    if engine_cfg.kind == "zeroshot":
        return [("patch_features", zeroshot_params(engine_cfg))]
    if engine_cfg.kind == "dqformer":
        return [("dqformer", dqformer_params(engine_cfg.checkpoint))]
    raise ValueError(f"engine kind {engine_cfg.kind!r} has no exportable model")


def _targets(args, cfg) -> list[tuple[str, dict]]:
    if args.model:
        return [(args.model, _parse_params(args.param))]
    return config_models(cfg.engine)


def run(args) -> int:
    """Entry point of ``linewatch engines``; returns the exit code."""
    from ..config import load_or_report

    cfg = load_or_report(args.config)
    if cfg is None:
        return 1
    engines_dir = args.engines_dir or Path(getattr(cfg.engine, "engines_dir", "engines"))
    try:
        if args.engines_cmd == "list":
            return _list(engines_dir)
        targets = _targets(args, cfg)
        if args.engines_cmd == "export":
            return _export(targets, engines_dir, args.force)
        return _build(targets, engines_dir, args, cfg)
    except (KeyError, ValueError, OSError) as exc:
        print(f"linewatch engines {args.engines_cmd}: {exc.args[0] if isinstance(exc, KeyError) else exc}",
              file=sys.stderr)
        return 1


def _export(targets, engines_dir: Path, force: bool) -> int:
    from .export import check_onnx, export_onnx

    for model, params in targets:
        path, reason = check_onnx(model, params, engines_dir)
        if reason is None and not force:
            print(f"{path}: current")
            continue
        path, m = export_onnx(model, params, engines_dir)
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in m.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in m.outputs)
        print(f"{path}: exported ({reason or 'forced'}); {m.version}, weights {m.weights_hash}, opset {m.opset}; "
              f"in {ins} -> out {outs}")
    return 0


def _build(targets, engines_dir: Path, args, cfg) -> int:
    from . import BackendUnavailable, backend_problem

    problem = backend_problem("tensorrt")
    if problem:
        print(f"linewatch engines build: {problem}", file=sys.stderr)
        return 1
    from .tensorrt_backend import ensure_plan

    opt = args.opt_batch or cfg.inspect.batch_size
    for model, params in targets:
        try:
            plan, fields = ensure_plan(model, params, engines_dir, opt_batch=opt, max_batch=args.max_batch,
                                       precision=args.precision, calibration_folder=args.calibration,
                                       force=args.force, progress=not args.no_progress)
        except BackendUnavailable as exc:
            print(f"linewatch engines build: {exc}", file=sys.stderr)
            return 1
        print(f"{plan}: {fields.precision}, TensorRT {fields.tensorrt_version}, sm "
              f"{fields.compute_capability[0]}.{fields.compute_capability[1]}, batch 1/{opt}/{max(args.max_batch, opt)}")
    return 0


def _list(engines_dir: Path) -> int:
    from .export import check_onnx
    from .manifest import read_manifest

    files = sorted(Path(engines_dir).glob("*.onnx")) + sorted(Path(engines_dir).glob("*.plan"))
    if not files:
        print(f"{engines_dir}: no ONNX files or plans (run `linewatch engines export`)")
        return 0
    for f in files:
        if f.suffix == ".onnx":
            m = read_manifest(f.with_suffix(".json"))
            if m is None:
                print(f"{f}: no manifest (stale)")
                continue
            _, reason = check_onnx(m.model, m.params, engines_dir)
            print(f"{f}: {m.model} {m.version} opset {m.opset}: {'current' if reason is None else 'STALE: ' + reason}")
        else:
            try:
                meta = json.loads(f.with_suffix(".json").read_text(encoding="utf-8"))
                fl = meta["fields"]
                print(f"{f}: {fl['model']} {fl['precision']} TensorRT {fl['tensorrt_version']} sm "
                      f"{'.'.join(map(str, fl['compute_capability']))}, built in {meta.get('build_s')} s")
            except (OSError, ValueError, KeyError):
                print(f"{f}: no manifest (never loaded)")
    return 0
