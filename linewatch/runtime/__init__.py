"""Engine backends (torch, onnxruntime, tensorrt): registry, optional-package checks, extractors.

Backends are registered here by name and imported lazily, so importing linewatch (and running the
CPU daemon or the tests) never needs tensorrt or pycuda. :func:`missing_packages` is what the
config loader calls to turn "backend = tensorrt" on a box without TensorRT into a one-line error.

How the zero-shot engine gets its feature extractor per backend (:func:`create_extractor`):
- ``torch``: ``linewatch.engines.zeroshot.TorchExtractor`` (traced, frozen).
- ``onnxruntime``: the backbone's ONNX file in ``engines_dir`` is **exported on first use** when it
  is missing or stale (its manifest's weights hash / version / parameters differ from the
  installed weights). Export takes seconds and needs only torch, which the daemon has anyway; if
  ``engines_dir`` is not writable the error says to run ``linewatch engines export``.
- ``tensorrt``: the same ONNX step, then the FP16 plan for this GPU is looked up in the plan cache
  and built when absent (minutes, logged); see :mod:`linewatch.runtime.tensorrt_backend`.

The DQFormer engine gets its graph runner the same way (:func:`create_dqformer_runner`): the
checkpoint named in config is the model, exported (and built) again whenever its file changes.
"""

from __future__ import annotations

import importlib.util
import logging

from ..engines import EngineUnavailable

logger = logging.getLogger(__name__)

# backend -> (module, optional packages it imports: (import name, pip name))
BACKENDS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "torch": ("linewatch.engines.zeroshot", ()),
    "onnxruntime": ("linewatch.runtime.ort_backend", (("onnxruntime", "onnxruntime"), ("onnx", "onnx"))),
    "tensorrt": ("linewatch.runtime.tensorrt_backend", (("tensorrt", "tensorrt"), ("pycuda", "pycuda"))),
}


class BackendUnavailable(EngineUnavailable):
    """A backend cannot be used here: a package is missing, or its artifact cannot be made."""


def missing_packages(backend: str) -> list[str]:
    """pip names of the packages ``backend`` needs that are not installed (nothing is imported)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {sorted(BACKENDS)}")
    return [pip for mod, pip in BACKENDS[backend][1] if importlib.util.find_spec(mod) is None]


def backend_problem(backend: str) -> str | None:
    """One line saying why ``backend`` cannot run on this machine, or None."""
    missing = missing_packages(backend)
    if not missing:
        return None
    extra = " (pip install 'linewatch[gpu]')" if backend == "tensorrt" else ""
    return f"backend '{backend}' needs the package{'s' if len(missing) > 1 else ''} " \
           f"{', '.join(repr(m) for m in missing)}, which {'are' if len(missing) > 1 else 'is'} not installed{extra}"


def require_backend(backend: str) -> None:
    """Raise :class:`BackendUnavailable` (one line) when ``backend``'s packages are missing."""
    problem = backend_problem(backend)
    if problem:
        raise BackendUnavailable(problem)


def create_extractor(cfg, *, batch_size: int = 4):
    """The zero-shot feature extractor for ``cfg.backend`` (an ``engine`` config section).

    ``batch_size`` is the batch the TensorRT plan is optimised for (the inspector's batch)."""
    require_backend(cfg.backend)
    if cfg.backend == "torch":
        from ..engines.zeroshot import TorchExtractor

        return TorchExtractor(cfg.feature_dim, device=cfg.device, threads=cfg.threads,
                              context=float(cfg.context_weight) > 0)
    from .models import zeroshot_params

    params = zeroshot_params(cfg)
    if cfg.backend == "onnxruntime":
        from .ort_backend import OrtExtractor

        return OrtExtractor.for_model("patch_features", params, cfg.engines_dir, device=cfg.device,
                                      threads=cfg.threads)
    from .tensorrt_backend import TrtExtractor

    return TrtExtractor.for_model("patch_features", params, cfg.engines_dir, opt_batch=batch_size)


def cuda_index(device: str) -> int:
    """The GPU index of a torch-style device string: "cuda" -> 0, "cuda:1" -> 1."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise ValueError(f"device {device!r}: expected cuda or cuda:<index>")
    return int(index or 0)


def create_dqformer_runner(cfg, *, batch_size: int = 4):
    """(runner, tag) for a DQFormer engine config on backend onnxruntime or tensorrt: ``runner.run``
    takes the named numpy inputs of the exported graph (image, words, word_mask, sentence) and
    returns [logits]; ``tag`` names the backend in the engine's version ("ort", "trtfp16")."""
    from .models import dqformer_params

    require_backend(cfg.backend)
    params = dqformer_params(cfg.checkpoint)
    if cfg.backend == "onnxruntime":
        from .ort_backend import OrtRunner

        return OrtRunner.for_model("dqformer", params, cfg.engines_dir, device=cfg.device, threads=cfg.threads), "ort"
    if cfg.backend == "tensorrt":
        from .tensorrt_backend import TrtRunner

        runner, fields = TrtRunner.for_model("dqformer", params, cfg.engines_dir, opt_batch=batch_size,
                                             device=cuda_index(cfg.device))
        return runner, f"trt{fields.precision}"
    raise ValueError(f"backend {cfg.backend!r} has no exported DQFormer runner")
