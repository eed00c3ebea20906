"""ONNX export of registered models (dynamic batch; fixed or dynamic image size) with manifests.

:func:`export_onnx` always exports; :func:`ensure_onnx` exports only when the file in
``engines_dir`` is missing or stale (see :func:`linewatch.runtime.manifest.onnx_stale_reason`).
Files are written under a temporary name and renamed, manifest last, so a reader never sees a
half-written model with a current manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from pathlib import Path

import torch

from .. import __version__ as _release
from .manifest import (Manifest, TensorSpec, manifest_path, onnx_stale_reason, read_manifest, sha256_file,
                       write_json_atomic)
from .models import ModelSpec, Params, get_spec

logger = logging.getLogger(__name__)

OPSET = 17


def onnx_path(engines_dir: Path, spec: ModelSpec, params: Params) -> Path:
    """Where ``spec`` exported with ``params`` lives."""
    return Path(engines_dir) / f"{spec.stem(params)}.onnx"


def _np_dtype(t: torch.Tensor) -> str:
    return str(t.numpy().dtype) if t.dtype != torch.bool else "bool"


def _specs(names, tensors, axes) -> list[TensorSpec]:
    out = []
    for n, t in zip(names, tensors):
        shape: list[int | str] = list(t.shape)
        for i, name in axes.get(n, {}).items():
            shape[i] = name
        out.append(TensorSpec(n, _np_dtype(t), shape))
    return out


def export_onnx(model: str, params: Params | None, engines_dir: Path, *, opset: int = OPSET,
                module: torch.nn.Module | None = None) -> tuple[Path, Manifest]:
    """Export ``model`` (a registry name) to ``engines_dir``; returns the file and its manifest."""
    spec = get_spec(model)
    params = spec.resolve(params)
    engines_dir = Path(engines_dir)
    engines_dir.mkdir(parents=True, exist_ok=True)
    module = spec.build(params) if module is None else module
    module.eval()
    path = onnx_path(engines_dir, spec, params)
    example = spec.example_inputs(module, params, 2)
    axes = spec.dynamic_axes(params)
    t0 = time.perf_counter()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic, expected
            outputs = module(*example)
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            torch.onnx.export(module, example, str(tmp), input_names=list(spec.input_names),
                              output_names=list(spec.output_names), dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    manifest = Manifest(
        model=spec.name, version=spec.version(params, module), weights_hash=spec.weights_hash(params, module),
        params=params, inputs=_specs(spec.input_names, example, axes),
        outputs=_specs(spec.output_names, outputs, axes), opset=opset, torch_version=torch.__version__,
        onnx_sha256=sha256_file(path), exported_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        linewatch_version=exporter_version())
    write_json_atomic(manifest_path(path), manifest.to_json())
    logger.info("exported %s (%s) to %s in %.1f s", spec.name, manifest.version, path, time.perf_counter() - t0)
    return path, manifest


def exporter_version() -> str:
    """The linewatch release and a hash of the network code (``linewatch/models``) that traces
    the graph: a fixed forward pass with unchanged weights is another export."""
    h = hashlib.sha256()
    for f in sorted((Path(__file__).resolve().parents[1] / "models").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"{_release}+{h.hexdigest()[:12]}"


def check_onnx(model: str, params: Params | None, engines_dir: Path, *, opset: int = OPSET,
               module: torch.nn.Module | None = None) -> tuple[Path, str | None]:
    """(path, why it is stale or None) for the export of ``model`` with ``params``."""
    spec = get_spec(model)
    params = spec.resolve(params)
    path = onnx_path(engines_dir, spec, params)
    digest = sha256_file(path) if path.is_file() else None
    manifest = read_manifest(manifest_path(path))
    if digest is None or manifest is None:
        return path, onnx_stale_reason(manifest, model=spec.name, version="", weights_hash="", params=params,
                                       opset=opset, onnx_sha256=digest)
    module = spec.build(params) if module is None else module
    return path, onnx_stale_reason(manifest, model=spec.name, version=spec.version(params, module),
                                   weights_hash=spec.weights_hash(params, module), params=params, opset=opset,
                                   onnx_sha256=digest, linewatch_version=exporter_version(),
                                   torch_version=torch.__version__)


def ensure_onnx(model: str, params: Params | None, engines_dir: Path, *, opset: int = OPSET) -> tuple[Path, Manifest]:
    """The current export of ``model`` in ``engines_dir``, exporting first when missing or stale.

    Raises ``PermissionError``/``OSError`` when it must export and cannot write there."""
    spec = get_spec(model)
    params = spec.resolve(params)
    module = spec.build(params)
    path, reason = check_onnx(model, params, engines_dir, opset=opset, module=module)
    if reason is None:
        manifest = read_manifest(manifest_path(path))
        assert manifest is not None
        return path, manifest
    logger.info("exporting %s to %s: %s", spec.name, path, reason)
    return export_onnx(model, params, engines_dir, opset=opset, module=module)
