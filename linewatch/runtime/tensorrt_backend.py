"""TensorRT backend (``gpu`` extra: tensorrt, pycuda): plan building, the plan cache, INT8
calibration, and a runner with pycuda device buffers, one stream and optional CUDA graphs.

Written against the TensorRT 10 Python API (names checked against tensorrt-stubs 10.13) and never
yet run on a GPU: see ``bench/RESULTS.md`` and ``tests/gpu/``.

Nothing here is imported unless the tensorrt backend is chosen (``linewatch.runtime`` checks the
packages first and names the missing one). The cache logic itself is pure and lives in
:mod:`linewatch.runtime.manifest`, tested without a GPU.

Plans: built from the exported ONNX file with one optimisation profile (batch 1 / opt / max; the
image size is fixed by the export), FP16 by default, INT8 with entropy calibration on frames from
a replay folder as an option, FP32 for debugging. ``build_plan`` shows a progress bar (TensorRT's
``IProgressMonitor``, TensorRT >= 10) and writes the plan + its manifest atomically.

Runtime: :class:`TrtRunner` deserialises a plan once, allocates device buffers for the maximum
batch and pinned host buffers, and runs ``execute_async_v3`` on its own stream. Batches larger than
the profile's maximum are split. With ``cuda_graphs=True`` the enqueue for each batch size is
captured once into a CUDA graph and replayed (it pays for small batches, where launch overhead
dominates; the copies stay outside the graph). All CUDA calls happen with the runner's context
pushed, so it can be used from the inspector's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import BackendUnavailable, require_backend
from .manifest import (Manifest, PlanKeyFields, make_plan_fields, manifest_path, plan_manifest_text, plan_path,
                       plan_stale_reason, sha256_file, write_json_atomic)
from .models import Params, get_spec

require_backend("tensorrt")  # one clear line instead of a bare ModuleNotFoundError

import pycuda.driver as cuda  # noqa: E402
import tensorrt as trt  # noqa: E402

logger = logging.getLogger(__name__)

TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
TRT_MAJOR = int(trt.__version__.split(".")[0])
DEFAULT_WORKSPACE_BYTES = 2 << 30
DEFAULT_MAX_BATCH = 16


# ---------------------------------------------------------------------------------------- device
_CONTEXTS: dict[int, "cuda.Context"] = {}


def device_context(device: int = 0) -> "cuda.Context":
    """The retained primary CUDA context of ``device`` (shared with any other CUDA user)."""
    ctx = _CONTEXTS.get(device)
    if ctx is None:
        cuda.init()
        ctx = _CONTEXTS[device] = cuda.Device(device).retain_primary_context()
    return ctx


def compute_capability(device: int = 0) -> tuple[int, int]:
    """(major, minor) of the GPU, part of every plan key."""
    cuda.init()
    major, minor = cuda.Device(device).compute_capability()
    return int(major), int(minor)


class _Pushed:
    """``with _Pushed(ctx):`` makes ``ctx`` current on this thread for the block."""

    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        self.ctx.push()

    def __exit__(self, *exc):
        cuda.Context.pop()


# -------------------------------------------------------------------------------------- progress
if hasattr(trt, "IProgressMonitor"):
    class BuildProgress(trt.IProgressMonitor):
        """TensorRT build phases shown as nested tqdm bars (stderr)."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, object] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            from tqdm import tqdm

            depth = 0 if parent_phase is None else 1 + list(self._bars).count(parent_phase)
            self._bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=depth, leave=depth == 0)

        def step_complete(self, phase_name, step):
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()
else:  # TensorRT 8.x: no progress callbacks, a log line per phase is all there is
    BuildProgress = None


# ------------------------------------------------------------------------------------------ INT8
def calibration_batches(folder: Path, input_size: int, batch: int, limit: int = 256) -> list[np.ndarray]:
    """Preprocessed float32 N x 3 x S x S batches from the images of a replay folder (sorted)."""
    from ..models.backbone import preprocess, resize_uint8
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))
    if not files:
        raise BackendUnavailable(f"INT8 calibration: no images in {folder}")
    images = []
    for p in files[:limit]:
        im = np.asarray(Image.open(p).convert("RGB"))
        images.append(resize_uint8(im, input_size, input_size))
    x = preprocess(np.stack(images)).numpy()
    return [np.ascontiguousarray(x[i:i + batch]) for i in range(0, len(x), batch) if len(x[i:i + batch]) == batch]


def calibration_hash(batches: Sequence[np.ndarray]) -> str:
    """Hash of a calibration set (part of an INT8 plan's key)."""
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        h.update(np.ascontiguousarray(b).tobytes())
    return h.hexdigest()[:16]


_CALIBRATOR_BASE = getattr(trt, "IInt8EntropyCalibrator2", object)  # implicit INT8: deprecated in TensorRT 10.1


class EntropyCalibrator(_CALIBRATOR_BASE):
    """INT8 entropy calibration over preprocessed batches; the table is cached beside the plan."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray], cache_path: Path):
        if _CALIBRATOR_BASE is object:
            raise BackendUnavailable(f"TensorRT {trt.__version__} has no implicit INT8 calibration "
                                     f"(IInt8EntropyCalibrator2); build fp16, or use TensorRT 10.x for int8")
        _CALIBRATOR_BASE.__init__(self)
        self.input_name = input_name
        self.batches = list(batches)
        self.cache_path = Path(cache_path)
        self._i = 0
        self._dev = cuda.mem_alloc(self.batches[0].nbytes)

    def get_batch_size(self) -> int:
        return int(self.batches[0].shape[0])

    def get_batch(self, names: list[str]):
        if self._i >= len(self.batches):
            return None
        cuda.memcpy_htod(self._dev, self.batches[self._i])
        self._i += 1
        return [int(self._dev)]

    def read_calibration_cache(self):
        return self.cache_path.read_bytes() if self.cache_path.is_file() else None

    def write_calibration_cache(self, cache) -> None:
        self.cache_path.write_bytes(bytes(cache))


# ----------------------------------------------------------------------------------------- build
def build_plan(onnx_file: Path, fields: PlanKeyFields, out: Path, *, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
               calibration: Sequence[np.ndarray] | None = None, progress: bool = True) -> Path:
    """Compile ``onnx_file`` into a TensorRT plan at ``out`` for ``fields`` (profile + precision)."""
    t0 = time.perf_counter()
    builder = trt.Builder(TRT_LOGGER)
    flags = 0 if TRT_MAJOR >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, TRT_LOGGER)
    if not parser.parse(Path(onnx_file).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT cannot parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in fields.profiles:
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    if fields.precision in ("fp16", "int8"):
        if not getattr(builder, "platform_has_fast_fp16", True):
            logger.warning("this GPU has no fast FP16; building anyway")
        config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if fields.precision == "int8":
        if not calibration:
            raise ValueError("an int8 plan needs calibration batches")
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = EntropyCalibrator(fields.profiles[0][0], calibration, out.with_suffix(".calib"))
        config.int8_calibrator = calibrator
        calib_profile = builder.create_optimization_profile()
        shape = calibration[0].shape
        for name, _ in fields.profiles:
            calib_profile.set_shape(name, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
    monitor = BuildProgress() if (progress and BuildProgress is not None) else None
    if monitor is not None:
        config.progress_monitor = monitor
    logger.info("building TensorRT %s plan for %s (%s): this takes minutes", fields.precision, onnx_file,
                trt.__version__)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailable(f"TensorRT failed to build a plan from {onnx_file} (see the TensorRT log above)")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out)
    build_s = time.perf_counter() - t0
    write_json_atomic(manifest_path(out), plan_manifest_text(fields, sha256_file(out), build_s))
    logger.info("TensorRT plan %s built in %.0f s", out, build_s)
    return out


def plan_fields_for(manifest: Manifest, *, opt_batch: int, max_batch: int = DEFAULT_MAX_BATCH,
                    precision: str = "fp16", calibration: str = "", device: int = 0) -> PlanKeyFields:
    """Plan key fields for this machine (TensorRT version, this GPU's compute capability)."""
    return make_plan_fields(manifest, opt_batch=opt_batch, max_batch=max(max_batch, opt_batch), precision=precision,
                            tensorrt_version=trt.__version__, compute_capability=compute_capability(device),
                            calibration=calibration)


def ensure_plan(model: str, params: Params, engines_dir: Path, *, opt_batch: int, max_batch: int = DEFAULT_MAX_BATCH,
                precision: str = "fp16", calibration_folder: Path | None = None, force: bool = False,
                progress: bool = True, device: int = 0) -> tuple[Path, PlanKeyFields]:
    """The cached plan for ``model`` on this GPU, building it (and the ONNX export) when absent.

    The plan's file name carries :func:`plan_key`, so any change of weights, shapes, precision,
    TensorRT version or GPU picks a new file and a rebuild; the old plan is left for its owner
    (another GPU sharing ``engines_dir``) and never loaded."""
    import json

    from .export import ensure_onnx

    onnx_file, manifest = ensure_onnx(model, params, engines_dir)
    batches, calib = None, ""
    if precision == "int8":
        if calibration_folder is None:
            raise ValueError("precision int8 needs a calibration folder (frames from a replay folder)")
        if len(manifest.inputs) != 1:  # the calibrator feeds images only: not a sentence's tensors
            raise ValueError(f"precision int8 is for single-input models; {model} takes "
                             f"{', '.join(t.name for t in manifest.inputs)}: build it as fp16")
        size = int(get_spec(model).resolve(params).get("input_size", 256))
        batches = calibration_batches(calibration_folder, size, opt_batch)
        calib = calibration_hash(batches)
    fields = plan_fields_for(manifest, opt_batch=opt_batch, max_batch=max_batch, precision=precision,
                             calibration=calib, device=device)
    out = plan_path(engines_dir, onnx_file.stem, fields)
    try:
        plan_manifest = json.loads(manifest_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        plan_manifest = None
    reason = "rebuild forced" if force else plan_stale_reason(
        plan_manifest, fields, sha256_file(out) if out.is_file() else None)
    if reason is None:
        logger.info("TensorRT plan cache hit: %s", out)
        return out, fields
    logger.info("TensorRT plan %s: %s; building", out.name, reason)
    with _Pushed(device_context(device)):
        build_plan(onnx_file, fields, out, calibration=batches, progress=progress)
    return out, fields


# ---------------------------------------------------------------------------------------- runner
class TrtRunner:
    """One deserialised plan: device buffers for the max batch, pinned host buffers, a stream."""

    def __init__(self, plan: Path, *, device: int = 0, cuda_graphs: bool = False):
        self.ctx = device_context(device)
        self.plan = Path(plan)
        with _Pushed(self.ctx):
            self.runtime = trt.Runtime(TRT_LOGGER)
            self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
            if self.engine is None:
                raise BackendUnavailable(f"TensorRT cannot deserialise {plan} (built by another version?)")
            self.context = self.engine.create_execution_context()
            self.stream = cuda.Stream()
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            self.max_batch = min(int(self.engine.get_tensor_profile_shape(n, 0)[2][0]) for n in self.inputs)
            self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
            self._dev: dict[str, object] = {}
            self._host: dict[str, np.ndarray] = {}
            for n in self.inputs:
                shape = tuple(self.engine.get_tensor_profile_shape(n, 0)[2])
                self.context.set_input_shape(n, shape)
            for n in names:
                shape = tuple(self.context.get_tensor_shape(n))
                self._host[n] = cuda.pagelocked_empty(shape, self.dtypes[n])
                self._dev[n] = cuda.mem_alloc(self._host[n].nbytes)
                self.context.set_tensor_address(n, int(self._dev[n]))
        self.cuda_graphs = bool(cuda_graphs) and hasattr(self.stream, "begin_capture")
        if cuda_graphs and not self.cuda_graphs:
            logger.warning("this pycuda has no stream capture: CUDA graphs off")
        self._graphs: dict[int, object] = {}
        self._shape_batch = -1
        self._shape_changed = False
        # one context, stream and set of buffers: tier 1 (inspector thread) and PGT's feature
        # extraction (refine worker) must not interleave on them
        self._run_lock = threading.Lock()

    @classmethod
    def for_model(cls, model: str, params: Params, engines_dir: Path, *, opt_batch: int = 4,
                  precision: str = "fp16", cuda_graphs: bool = True,
                  device: int = 0) -> tuple["TrtRunner", PlanKeyFields]:
        """A runner on ``model``'s plan for this GPU (exported and built first when needed),
        with the plan's key fields."""
        try:
            plan, fields = ensure_plan(model, params, Path(engines_dir), opt_batch=opt_batch, precision=precision,
                                       progress=False, device=device)
        except OSError as exc:
            raise BackendUnavailable(
                f"backend 'tensorrt': cannot export or build {model} in {engines_dir} ({exc}); run "
                f"'linewatch engines build' as a user who can write there") from None
        return cls(plan, device=device, cuda_graphs=cuda_graphs), fields

    def _set_batch(self, n: int) -> None:
        if n == self._shape_batch:
            return
        for name in self.inputs:
            self.context.set_input_shape(name, (n, *self._host[name].shape[1:]))
        self._shape_batch = n
        self._shape_changed = True  # TensorRT applies it at the next enqueue, not at a graph launch

    def _enqueue(self, n: int) -> None:
        if not self.cuda_graphs:
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            return
        graph = self._graphs.get(n)
        if graph is not None and self._shape_changed:
            # the context last ran another batch size: a graph launch would replay on its stale
            # shape state; a plain run applies the new shapes (and computes this batch)
            self._shape_changed = False
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            return
        self._shape_changed = False
        if graph is None:
            # one plain run first flushes TensorRT's deferred shape updates (required before capture)
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            self.stream.synchronize()
            capturing = False
            try:
                self.stream.begin_capture()
                capturing = True
                self.context.execute_async_v3(self.stream.handle)
                captured = self.stream.end_capture()
                capturing = False
                graph = self._graphs[n] = captured.instance()
            except (cuda.Error, AttributeError, TypeError) as exc:
                # capture refused (driver, a plan with host callbacks, an older pycuda): run plain
                if capturing:
                    try:
                        self.stream.end_capture()
                    except cuda.Error:
                        pass  # the capture is already invalid; the stream is usable again either way
                logger.warning("CUDA graph capture failed (%s): CUDA graphs off", exc)
                self.cuda_graphs = False
                return  # the plain run above already produced this batch's outputs
        graph.launch(self.stream)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on named host arrays (any batch; split by the profile's max); outputs in order.
        Thread-safe: concurrent calls run one after the other."""
        total = int(next(iter(inputs.values())).shape[0])
        parts: list[list[np.ndarray]] = [[] for _ in self.outputs]
        with self._run_lock, _Pushed(self.ctx):
            for s in range(0, total, self.max_batch):
                n = min(self.max_batch, total - s)
                self._set_batch(n)
                for name in self.inputs:
                    src = np.ascontiguousarray(inputs[name][s:s + n], dtype=self.dtypes[name])
                    host = self._host[name].reshape(-1)[:src.size].reshape(src.shape)
                    host[...] = src
                    cuda.memcpy_htod_async(self._dev[name], host, self.stream)
                self._enqueue(n)
                views = []
                for name in self.outputs:
                    shape = tuple(self.context.get_tensor_shape(name))
                    host = self._host[name].reshape(-1)[:int(np.prod(shape))].reshape(shape)
                    cuda.memcpy_dtoh_async(host, self._dev[name], self.stream)
                    views.append(host)
                self.stream.synchronize()
                for i, v in enumerate(views):
                    parts[i].append(v.copy())
        return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]

    def device_memory_bytes(self) -> int:
        """Device memory held by the engine (activations) plus the I/O buffers."""
        io = sum(h.nbytes for h in self._host.values())
        return int(getattr(self.engine, "device_memory_size_v2", getattr(self.engine, "device_memory_size", 0))) + io


class TrtExtractor:
    """Zero-shot feature extractor on a TensorRT plan (float32 in, float32 features out)."""

    def __init__(self, runner: TrtRunner, version: str):
        self.runner = runner
        self.name = "patch_features"
        self.version = version
        self._input = runner.inputs[0]

    @classmethod
    def for_model(cls, model: str, params: Params, engines_dir: Path, *, opt_batch: int = 4,
                  precision: str = "fp16", cuda_graphs: bool = True, device: int = 0) -> "TrtExtractor":
        """Load (building when needed) the plan of ``model`` for this GPU."""
        runner, fields = TrtRunner.for_model(model, params, engines_dir, opt_batch=opt_batch, precision=precision,
                                             cuda_graphs=cuda_graphs, device=device)
        return cls(runner, f"{fields.version}-trt{fields.precision}")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.run({self._input: batch})[0].astype(np.float32, copy=False)

