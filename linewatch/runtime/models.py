"""Exportable models: a small registry of name -> how to build the torch module, example inputs,
dynamic axes and weights hash. Adding a model (the ARD, say) is one :class:`ModelSpec` entry.

``params`` are plain JSON-able dicts (they go into the manifest and into the staleness check);
every spec fills its defaults with :meth:`ModelSpec.resolve`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

Params = dict[str, Any]


@dataclass(frozen=True)
class ModelSpec:
    """How one model is exported.

    build(params) -> module in eval mode; example_inputs(module, params, batch) -> input tensors in
    ``input_names`` order; weights_hash(params, module) -> short hex string naming the weights;
    version(params, module) -> the model version string written to results and the manifest.
    ``dynamic_axes(params)`` -> torch.onnx dynamic_axes (batch always dynamic; H, W when
    ``params['dynamic_size']``). ``stem(params)`` -> artifact file stem in ``engines/``.
    """

    name: str
    description: str
    build: Callable[[Params], nn.Module]
    example_inputs: Callable[[nn.Module, Params, int], tuple[torch.Tensor, ...]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Callable[[Params], dict[str, dict[int, str]]]
    weights_hash: Callable[[Params, nn.Module | None], str]
    version: Callable[[Params, nn.Module], str]
    stem: Callable[[Params], str]
    defaults: Params = field(default_factory=dict)

    def resolve(self, params: Params | None = None) -> Params:
        """``params`` over the defaults; unknown keys are an error (they would silently not apply)."""
        params = dict(params or {})
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"model '{self.name}': unknown parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        return {**self.defaults, **params}


def state_dict_hash(module: nn.Module) -> str:
    """Short sha256 over a module's state dict (names, dtypes, shapes, bytes), in key order."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:10]


def _bytes_hash(data: bytes) -> str:
    """Short sha256 of bytes, the same digits as :func:`file_hash` of a file holding them."""
    return hashlib.sha256(data).hexdigest()[:10]


def file_hash(path: Path | str) -> str:
    """Short sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


# ------------------------------------------------------------------------ zero-shot patch features
def _pf_build(p: Params) -> nn.Module:
    from ..models.backbone import PatchFeatures

    return PatchFeatures(out_dim=int(p["feature_dim"]), aggregate=bool(p["aggregate"]), context=bool(p["context"]))


def _pf_inputs(module: nn.Module, p: Params, batch: int) -> tuple[torch.Tensor, ...]:
    s = int(p["input_size"])
    return (torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0)),)


def _pf_hash(p: Params, module: nn.Module | None) -> str:
    from ..models.backbone import weights_hash

    return weights_hash()


def _pf_stem(p: Params) -> str:
    size = "dyn" if p["dynamic_size"] else str(int(p["input_size"]))
    return (f"patch_features-d{int(p['feature_dim'])}{'' if p['aggregate'] else '-noagg'}"
            f"{'-ctx' if p['context'] else ''}-s{size}")


PATCH_FEATURES = ModelSpec(
    name="patch_features",
    description="zero-shot engine backbone: EfficientNet-Lite0 stride-8/16 patch features (and the stride-32 "
                "context level)",
    build=_pf_build,
    example_inputs=_pf_inputs,
    input_names=("image",),
    output_names=("features",),
    dynamic_axes=lambda p: {"image": ({0: "batch", 2: "height", 3: "width"} if p["dynamic_size"] else {0: "batch"}),
                            "features": ({0: "batch", 2: "grid_h", 3: "grid_w"} if p["dynamic_size"] else {0: "batch"})},
    weights_hash=_pf_hash,
    version=lambda p, m: m.version,
    stem=_pf_stem,
    defaults={"feature_dim": 0, "aggregate": True, "context": False, "input_size": 256, "dynamic_size": False},
)


def zeroshot_params(cfg) -> Params:
    """Export parameters of the zero-shot backbone for an ``engine`` config section.

    Every extractor call sees square ``input_size`` tiles (see ``linewatch.engines.zeroshot``), so a
    fixed image size is exported: it lets ONNX Runtime and TensorRT plan for one shape."""
    from ..models.backbone import SIZE_MULTIPLE

    return {"feature_dim": int(cfg.feature_dim), "aggregate": True, "context": float(cfg.context_weight) > 0,
            "input_size": int(cfg.input_size) // SIZE_MULTIPLE * SIZE_MULTIPLE, "dynamic_size": False}


# ------------------------------------------------------------------------------------- DQFormer
def _dq_build(p: Params) -> nn.Module:
    from ..models.dqformer import DQFormer, DQFormerConfig, load_checkpoint

    if p["checkpoint"]:
        data = Path(p["checkpoint"]).read_bytes()
        model, _ = load_checkpoint(p["checkpoint"], data=data)
        model.checkpoint_hash = _bytes_hash(data)  # of the bytes loaded (see _dq_hash)
        return model.eval()
    # no checkpoint: the ImageNet backbone with a seeded, untrained head (benchmarks and tests only)
    torch.manual_seed(0)
    cfg = DQFormerConfig(image_hw=(int(p["input_size"]), int(p["input_size"])), pretrained=bool(p["pretrained"]))
    return DQFormer(cfg).eval()


def _dq_inputs(module: nn.Module, p: Params, batch: int) -> tuple[torch.Tensor, ...]:
    c = module.config
    h, w = c.image_hw
    g = torch.Generator().manual_seed(0)
    words = torch.randn(batch, c.max_tokens, c.text_dim, generator=g)
    mask = torch.ones(batch, c.max_tokens, dtype=torch.bool)
    mask[:, c.max_tokens // 2:] = False
    sent = torch.nn.functional.normalize(torch.randn(batch, c.text_dim, generator=g), dim=1)
    return torch.randn(batch, 3, h, w, generator=g), words, mask, sent


def _dq_hash(p: Params, module: nn.Module | None) -> str:
    # a built module's hash is of the bytes it was loaded from, not of the file now on disk: a
    # checkpoint replaced between the load and the hash (a deploy during an export) would record
    # the new file for the old weights
    if module is not None and getattr(module, "checkpoint_hash", None):
        return module.checkpoint_hash
    if p["checkpoint"]:
        return file_hash(p["checkpoint"])
    return state_dict_hash(module if module is not None else _dq_build(p))


def _dq_stem(p: Params) -> str:
    # the checkpoint's folder, name and a short hash of its whole path: training writes last.pt
    # into a folder per run, and two checkpoints must never take turns overwriting one export
    if not p["checkpoint"]:
        return f"dqformer-untrained{int(p['input_size'])}"
    ckpt = Path(p["checkpoint"])
    where = hashlib.sha256(str(ckpt).encode()).hexdigest()[:6]
    return "-".join(x for x in ("dqformer", ckpt.parent.name, ckpt.stem, where) if x)


def dqformer_params(checkpoint: Path | str) -> Params:
    """Export parameters of a DQFormer checkpoint: its resolved path, so that every command naming
    the same file (the daemon's config, `engines export`, `train eval --ckpt`) finds one export."""
    return {"checkpoint": str(Path(checkpoint).resolve())}


DQFORMER = ModelSpec(
    name="dqformer",
    description="referring segmenter (RIAS DQFormer): image + sentence features -> 2-class logits",
    build=_dq_build,
    example_inputs=_dq_inputs,
    input_names=("image", "words", "word_mask", "sentence"),
    output_names=("logits",),
    dynamic_axes=lambda p: {n: {0: "batch"} for n in ("image", "words", "word_mask", "sentence", "logits")},
    weights_hash=_dq_hash,
    version=lambda p, m: f"dqformer-{_dq_hash(p, m)}-{'x'.join(map(str, m.config.image_hw))}",
    stem=_dq_stem,
    defaults={"checkpoint": "", "input_size": 256, "pretrained": True},
)


# ----------------------------------------------------------------- AnoRefiner decoder (ARD)
def _refine_bounds() -> Params:
    """The ARD's fixed bounds at the shipped ``[refine]`` defaults (export parameters, so that an
    export with other bounds is another, current file)."""
    from ..config import RefineConfig

    r = RefineConfig()
    return {"delta_max": r.delta_max, "gate_units": r.gate_units, "raise_max": r.raise_max,
            "peak_window": r.peak_window_px}


def _ard_build(p: Params) -> nn.Module:
    from ..models.ard import ARD

    torch.manual_seed(0)
    # the decoder as the daemon's Refiner builds it: the same skip blur and the same fixed bounds
    model = ARD(int(p["feat_dim"]), int(p["width"]), skip_sigma=float(p["skip_sigma"]), delta_max=float(p["delta_max"]),
                gate_units=float(p["gate_units"]), raise_max=float(p["raise_max"]), peak_window=int(p["peak_window"]))
    if p["checkpoint"]:
        data = Path(p["checkpoint"]).read_bytes()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        model.checkpoint_hash = _bytes_hash(data)
    else:  # untrained: the head starts at zero, which would leave the decoder out of a parity check
        nn.init.normal_(model.head.weight, std=0.05)
    return model.eval()


def _ard_inputs(module: nn.Module, p: Params, batch: int) -> tuple[torch.Tensor, ...]:
    from ..models.ard import GRID_STRIDE

    s = int(p["input_size"])
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, s, s, generator=g),
            torch.randn(batch, int(p["feat_dim"]), s // GRID_STRIDE, s // GRID_STRIDE, generator=g),
            torch.randn(batch, 1, s // GRID_STRIDE, s // GRID_STRIDE, generator=g))


def _ard_hash(p: Params, module: nn.Module | None) -> str:
    # a built module's hash is of the bytes it was loaded from, not of the file now on disk: a
    # checkpoint replaced between the load and the hash (a deploy during an export) would record
    # the new file for the old weights
    if module is not None and getattr(module, "checkpoint_hash", None):
        return module.checkpoint_hash
    if p["checkpoint"]:
        return file_hash(p["checkpoint"])
    return state_dict_hash(module if module is not None else _ard_build(p))


ARD_SPEC = ModelSpec(
    name="ard",
    description="AnoRefiner decoder: image + patch features + coarse scores -> pixel logits",
    build=_ard_build,
    example_inputs=_ard_inputs,
    input_names=("image", "feat", "coarse"),
    output_names=("logits",),
    dynamic_axes=lambda p: {n: {0: "batch"} for n in ("image", "feat", "coarse", "logits")},
    weights_hash=_ard_hash,
    version=lambda p, m: f"ard-{_ard_hash(p, m)}-d{int(p['feat_dim'])}-w{int(p['width'])}",
    stem=lambda p: (f"ard-{Path(p['checkpoint']).stem if p['checkpoint'] else 'untrained'}"
                    f"-d{int(p['feat_dim'])}-w{int(p['width'])}-s{int(p['input_size'])}"),
    defaults={"checkpoint": "", "feat_dim": 152, "width": 24, "input_size": 256,
              "skip_sigma": 0.5,  # the engine's default smooth_cells
              **_refine_bounds()},
)


MODELS: dict[str, ModelSpec] = {s.name: s for s in (PATCH_FEATURES, DQFORMER, ARD_SPEC)}


def get_spec(name: str) -> ModelSpec:
    """The registered spec called ``name`` (a one-line KeyError listing the known ones)."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}") from None
