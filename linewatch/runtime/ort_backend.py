"""ONNX Runtime backend: CPU execution provider by default, CUDA when the config asks for a
``cuda`` device and onnxruntime offers it (``onnxruntime-gpu``).

:class:`OrtRunner` runs any exported model (dict of numpy inputs -> list of outputs);
:class:`OrtExtractor` is the zero-shot engine's feature extractor on top of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import BackendUnavailable
from .manifest import Manifest
from .models import Params

logger = logging.getLogger(__name__)


def providers_for(device: str) -> list[str]:
    """Execution providers for a torch-style device string, best first."""
    available = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        logger.warning("device %r asked for, but onnxruntime offers only %s: running on CPU", device, available)
    return ["CPUExecutionProvider"]


class OrtRunner:
    """One ONNX Runtime session on an exported file. ``threads`` = 0: onnxruntime's default
    (all physical cores).

    ``spin=False`` (the default) stops the intra-op worker threads from busy-waiting after a run:
    in the daemon the scoring, acquisition and publishing threads need those cores right after
    the extractor returns, and on a 2-core box spinning workers starve them."""

    def __init__(self, path: Path, *, device: str = "cpu", threads: int = 0, manifest: Manifest | None = None,
                 spin: bool = False):
        so = ort.SessionOptions()
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads > 0:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # warnings about unused initialisers are noise here
        self.path = Path(path)
        self.manifest = manifest
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers_for(device))
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                ort.capi.onnxruntime_pybind11_state.NoSuchFile) as exc:
            raise BackendUnavailable(f"onnxruntime cannot load {path}: {exc}") from None
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def for_model(cls, model: str, params: Params, engines_dir: Path, *, device: str = "cpu",
                  threads: int = 0) -> "OrtRunner":
        """A session on ``model``'s export in ``engines_dir``, exporting it first when missing or
        stale (the manifest's weights hash, version or parameters differ)."""
        from .export import ensure_onnx

        try:
            path, manifest = ensure_onnx(model, params, Path(engines_dir))
        except OSError as exc:
            raise BackendUnavailable(
                f"backend 'onnxruntime': cannot export {model} into {engines_dir} ({exc}); run "
                f"'linewatch engines export' as a user who can write there") from None
        runner = cls(path, device=device, threads=threads, manifest=manifest)
        logger.info("onnxruntime %s on %s: %s", ort.__version__, ",".join(runner.providers), path)
        return runner

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph on named numpy inputs; outputs in graph order."""
        return self.session.run(self.output_names, inputs)


class OrtExtractor:
    """Zero-shot feature extractor on ONNX Runtime (float32 N x 3 x S x S -> N x C x S/8 x S/8)."""

    def __init__(self, runner: OrtRunner):
        self.runner = runner
        m = runner.manifest
        self.name = m.model if m else runner.path.stem
        self.version = m.version if m else runner.path.stem
        self.out_dim = int(m.outputs[0].shape[1]) if m else None
        self._input = runner.input_names[0]

    @classmethod
    def for_model(cls, model: str, params: Params, engines_dir: Path, *, device: str = "cpu",
                  threads: int = 0) -> "OrtExtractor":
        """Load ``model``'s export from ``engines_dir``, exporting it first when missing or stale."""
        return cls(OrtRunner.for_model(model, params, engines_dir, device=device, threads=threads))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self.runner.run({self._input: x})[0]
