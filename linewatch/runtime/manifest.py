"""Engine artifact manifests and the TensorRT plan cache key: pure functions, no GPU needed.

An exported ONNX file ``engines/<stem>.onnx`` has a manifest ``engines/<stem>.json``: model name,
version, weights hash, export parameters, input/output names and shapes (symbolic names for
dynamic axes), opset, the linewatch and torch versions that traced it and the ONNX file's own
hash. :func:`onnx_stale_reason` says
why an existing file must not be used (None when it is current).

A TensorRT plan is cached as ``engines/<stem>-<precision>-<key>.plan`` where ``key`` is
:func:`plan_key` of everything a plan depends on: weights hash, model version, input shapes (the
optimisation profile), precision (and the INT8 calibration data), TensorRT version and the GPU's
compute capability, and the ONNX file's hash. A changed input gives a different file name, so a stale plan is never even
opened; the plan's own manifest is checked again on load (:func:`plan_stale_reason`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FORMAT = "linewatch-onnx/1"
PLAN_FORMAT = "linewatch-trt-plan/1"
PRECISIONS = ("fp32", "fp16", "int8")

Shape = tuple[int | str, ...]  # str = a named dynamic axis


@dataclass
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (str entries are dynamic)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class Manifest:
    """What an exported ONNX file is (see the module docstring)."""

    model: str
    version: str
    weights_hash: str
    params: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    torch_version: str
    onnx_sha256: str
    exported_utc: str
    format: str = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    # the linewatch version that traced the graph: a new release may change the network's code
    # with the same weights ("" in manifests written before it was recorded: stale)
    linewatch_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["inputs"] = [TensorSpec(**t) for t in d.get("inputs", [])]
        d["outputs"] = [TensorSpec(**t) for t in d.get("outputs", [])]
        return cls(**d)


def manifest_path(onnx_path: Path) -> Path:
    """The manifest beside an ONNX file or a plan (``x.onnx`` -> ``x.json``)."""
    return Path(onnx_path).with_suffix(".json")


def write_json_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + rename (never a half-written manifest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600: the daemon's service user must read it
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``, or None when absent or unreadable (treated as stale)."""
    try:
        return Manifest.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def sha256_file(path: Path) -> str:
    """Full sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_stale_reason(manifest: Manifest | None, *, model: str, version: str, weights_hash: str,
                      params: dict[str, Any], opset: int, onnx_sha256: str | None,
                      linewatch_version: str = "", torch_version: str = "") -> str | None:
    """Why an exported file does not match what would be exported now; None when current.

    ``onnx_sha256`` is the hash of the file on disk (None: the file is missing). The same weights
    traced by another linewatch or torch version may be another graph (a fixed forward pass), so
    those are compared too when given."""
    if onnx_sha256 is None:
        return "the ONNX file is missing"
    if manifest is None:
        return "its manifest is missing or unreadable"
    if manifest.format != MANIFEST_FORMAT:
        return f"manifest format {manifest.format!r} is not {MANIFEST_FORMAT!r}"
    for what, have, want in (("model", manifest.model, model), ("weights hash", manifest.weights_hash, weights_hash),
                             ("version", manifest.version, version), ("parameters", manifest.params, params),
                             ("opset", manifest.opset, opset),
                             ("linewatch version", manifest.linewatch_version, linewatch_version or manifest.linewatch_version),
                             ("torch version", manifest.torch_version, torch_version or manifest.torch_version)):
        if have != want:
            return f"{what} changed: {have!r} -> {want!r}"
    if manifest.onnx_sha256 != onnx_sha256:
        return "the ONNX file does not match its manifest (replaced or half-written)"
    return None


# ---------------------------------------------------------------------------- TensorRT plan cache
@dataclass(frozen=True)
class PlanKeyFields:
    """Everything a TensorRT plan depends on. ``profiles`` maps input name -> (min, opt, max) shapes."""

    model: str
    version: str
    weights_hash: str
    profiles: tuple[tuple[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], ...]
    precision: str
    tensorrt_version: str
    compute_capability: tuple[int, int]
    calibration: str = ""  # hash of the INT8 calibration set ("" for fp16/fp32)
    onnx_sha256: str = ""  # the ONNX graph the plan is built from (a re-export is another plan)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "weights_hash": self.weights_hash,
                "onnx_sha256": self.onnx_sha256,
                "profiles": {n: [list(s) for s in mmo] for n, mmo in self.profiles},
                "precision": self.precision, "tensorrt_version": self.tensorrt_version,
                "compute_capability": list(self.compute_capability), "calibration": self.calibration}


def make_plan_fields(manifest: Manifest, *, opt_batch: int, max_batch: int, precision: str,
                     tensorrt_version: str, compute_capability: tuple[int, int],
                     calibration: str = "", image_hw: tuple[int, int] | None = None) -> PlanKeyFields:
    """Plan key fields for an exported model: batch profile 1 / ``opt_batch`` / ``max_batch`` on
    every input; dynamic spatial axes are fixed to ``image_hw`` (required when there are any)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got {opt_batch}, {max_batch}")
    if precision == "int8" and not calibration:
        raise ValueError("an int8 plan needs a calibration set (its hash is part of the key)")
    profiles = []
    for t in manifest.inputs:
        dims = []
        for i, d in enumerate(t.shape[1:], start=1):
            if isinstance(d, int):
                dims.append(d)
            elif image_hw is not None and i in (len(t.shape) - 2, len(t.shape) - 1):
                dims.append(int(image_hw[i - (len(t.shape) - 2)]))
            else:
                raise ValueError(f"input {t.name!r} axis {i} is dynamic ({d!r}): give image_hw")
        mmo = tuple((b, *dims) for b in (1, opt_batch, max_batch))
        profiles.append((t.name, mmo))
    return PlanKeyFields(manifest.model, manifest.version, manifest.weights_hash, tuple(profiles), precision,
                         str(tensorrt_version), (int(compute_capability[0]), int(compute_capability[1])),
                         calibration if precision == "int8" else "", manifest.onnx_sha256)


def plan_key(fields: PlanKeyFields) -> str:
    """16-hex-digit key of a plan's fields (canonical JSON, sha256)."""
    blob = json.dumps(fields.as_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_path(engines_dir: Path, stem: str, fields: PlanKeyFields) -> Path:
    """Where the plan for these fields lives: ``<engines_dir>/<stem>-<precision>-<key>.plan``."""
    return Path(engines_dir) / f"{stem}-{fields.precision}-{plan_key(fields)}.plan"


def plan_manifest_text(fields: PlanKeyFields, plan_sha256: str, build_s: float) -> str:
    """The JSON manifest written beside a plan."""
    return json.dumps({"format": PLAN_FORMAT, "key": plan_key(fields), "fields": fields.as_dict(),
                       "plan_sha256": plan_sha256, "build_s": round(build_s, 1)}, indent=2, sort_keys=True)


def plan_stale_reason(manifest: dict[str, Any] | None, fields: PlanKeyFields, plan_sha256: str | None) -> str | None:
    """Why a cached plan must not be loaded for ``fields``; None when it may."""
    if plan_sha256 is None:
        return "no plan for this key"
    if manifest is None:
        return "the plan's manifest is missing or unreadable"
    if manifest.get("format") != PLAN_FORMAT:
        return f"plan manifest format {manifest.get('format')!r} is not {PLAN_FORMAT!r}"
    want = fields.as_dict()
    have = manifest.get("fields") or {}
    for k in want:
        if have.get(k) != want[k]:
            return f"{k} changed: {have.get(k)!r} -> {want[k]!r}"
    if manifest.get("key") != plan_key(fields):
        return "key mismatch"
    if manifest.get("plan_sha256") != plan_sha256:
        return "the plan file does not match its manifest (replaced or half-written)"
    return None
