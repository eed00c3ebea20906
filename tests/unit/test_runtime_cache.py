"""Engine artifact bookkeeping without a GPU: plan cache keys and staleness, ONNX manifest
staleness, backend package checks (the tensorrt backend on a machine without TensorRT)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from linewatch.runtime import BackendUnavailable, backend_problem, missing_packages, require_backend
from linewatch.runtime.manifest import (Manifest, TensorSpec, make_plan_fields, onnx_stale_reason, plan_key,
                                        plan_manifest_text, plan_path, plan_stale_reason)
from linewatch.runtime.models import MODELS, get_spec

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None


def _manifest(**kw) -> Manifest:
    base = dict(model="patch_features", version="efficientnet_lite0-abc-s8s16a3-d64", weights_hash="abc",
                params={"feature_dim": 64, "input_size": 256}, inputs=[TensorSpec("image", "float32", ["batch", 3, 256, 256])],
                outputs=[TensorSpec("features", "float32", ["batch", 64, 32, 32])], opset=17,
                torch_version="2.x", onnx_sha256="f00", exported_utc="2026-01-01T00:00:00Z")
    base.update(kw)
    return Manifest(**base)


def _fields(**kw):
    f = make_plan_fields(_manifest(), opt_batch=4, max_batch=16, precision="fp16", tensorrt_version="10.3.0",
                         compute_capability=(8, 9))
    return dataclasses.replace(f, **kw)


def test_plan_profile_covers_batch_one_opt_and_max():
    f = _fields()
    assert f.profiles == (("image", ((1, 3, 256, 256), (4, 3, 256, 256), (16, 3, 256, 256))),)


def test_plan_key_is_stable_and_names_the_file(tmp_path):
    assert plan_key(_fields()) == plan_key(_fields())
    p = plan_path(tmp_path, "patch_features-d64-s256", _fields())
    assert p.parent == tmp_path and p.name == f"patch_features-d64-s256-fp16-{plan_key(_fields())}.plan"


@pytest.mark.parametrize("change", [
    {"weights_hash": "def"},
    {"version": "efficientnet_lite0-abc-s8s16a3-d32"},
    {"precision": "fp32"},
    {"tensorrt_version": "10.4.0"},
    {"compute_capability": (9, 0)},
    {"profiles": (("image", ((1, 3, 320, 320), (4, 3, 320, 320), (16, 3, 320, 320))),)},
    {"profiles": (("image", ((1, 3, 256, 256), (8, 3, 256, 256), (16, 3, 256, 256))),)},
    {"onnx_sha256": "a re-exported graph"},  # regression: a forced re-export kept the old plan
])
def test_any_changed_input_gives_another_plan(change, tmp_path):
    """Guards against loading a stale plan: every field of the key must move the key (and file)."""
    old, new = _fields(), _fields(**change)
    assert plan_key(old) != plan_key(new)
    assert plan_path(tmp_path, "m", old) != plan_path(tmp_path, "m", new)
    manifest = __import__("json").loads(plan_manifest_text(old, "sha", 1.0))
    reason = plan_stale_reason(manifest, new, "sha")
    assert reason is not None and "changed" in reason


def test_int8_key_includes_the_calibration_set():
    with pytest.raises(ValueError, match="calibration"):
        make_plan_fields(_manifest(), opt_batch=4, max_batch=16, precision="int8", tensorrt_version="10",
                         compute_capability=(8, 9))
    a = make_plan_fields(_manifest(), opt_batch=4, max_batch=16, precision="int8", tensorrt_version="10",
                         compute_capability=(8, 9), calibration="c1")
    b = dataclasses.replace(a, calibration="c2")
    assert plan_key(a) != plan_key(b)


def test_current_plan_loads_and_damaged_one_does_not():
    import json

    f = _fields()
    manifest = json.loads(plan_manifest_text(f, "sha-of-plan", 12.0))
    assert plan_stale_reason(manifest, f, "sha-of-plan") is None
    assert "missing" in plan_stale_reason(None, f, "sha-of-plan")
    assert "no plan" in plan_stale_reason(manifest, f, None)
    assert "does not match" in plan_stale_reason(manifest, f, "other-sha")
    assert "format" in plan_stale_reason({**manifest, "format": "x"}, f, "sha-of-plan")


def test_dynamic_spatial_axes_need_an_image_size():
    m = _manifest(inputs=[TensorSpec("image", "float32", ["batch", 3, "height", "width"])])
    with pytest.raises(ValueError, match="dynamic"):
        make_plan_fields(m, opt_batch=2, max_batch=4, precision="fp16", tensorrt_version="10", compute_capability=(8, 6))
    f = make_plan_fields(m, opt_batch=2, max_batch=4, precision="fp16", tensorrt_version="10",
                         compute_capability=(8, 6), image_hw=(320, 256))
    assert f.profiles[0][1][1] == (2, 3, 320, 256)


def test_onnx_staleness_reasons():
    m = _manifest()
    want = dict(model=m.model, version=m.version, weights_hash=m.weights_hash, params=m.params, opset=17)
    assert onnx_stale_reason(m, **want, onnx_sha256="f00") is None
    assert "missing" in onnx_stale_reason(m, **want, onnx_sha256=None)
    assert "manifest" in onnx_stale_reason(None, **want, onnx_sha256="f00")
    assert "weights hash changed" in onnx_stale_reason(m, **{**want, "weights_hash": "new"}, onnx_sha256="f00")
    assert "parameters changed" in onnx_stale_reason(m, **{**want, "params": {"feature_dim": 0}}, onnx_sha256="f00")
    assert "opset changed" in onnx_stale_reason(m, **{**want, "opset": 18}, onnx_sha256="f00")
    assert "does not match" in onnx_stale_reason(m, **want, onnx_sha256="other")

    # regression: the same weights traced by another linewatch (a fixed forward pass) or torch
    # were taken for the current export
    m2 = _manifest(linewatch_version="0.1.0+aaaa", torch_version="2.13.0")
    now = {**want, "linewatch_version": "0.1.0+aaaa", "torch_version": "2.13.0"}
    assert onnx_stale_reason(m2, **now, onnx_sha256="f00") is None
    assert "linewatch version changed" in onnx_stale_reason(m2, **{**now, "linewatch_version": "0.1.0+bbbb"},
                                                            onnx_sha256="f00")
    assert "torch version changed" in onnx_stale_reason(m2, **{**now, "torch_version": "2.14.0"}, onnx_sha256="f00")
    assert "linewatch version changed" in onnx_stale_reason(m, **now, onnx_sha256="f00")  # written before it was kept


def test_registry_specs_are_complete():
    for name, spec in MODELS.items():
        assert spec.name == name and spec.input_names and spec.output_names
        axes = spec.dynamic_axes(spec.resolve())
        assert all(axes[n][0] == "batch" for n in spec.input_names + spec.output_names)
    with pytest.raises(KeyError, match="registered"):
        get_spec("nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        get_spec("patch_features").resolve({"featuredim": 3})


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here: the missing-package path cannot be shown")
def test_tensorrt_backend_without_tensorrt_is_a_one_line_error(tmp_path):
    """Guards against a bare ModuleNotFoundError (or a silent fallback) when tensorrt is chosen."""
    assert "tensorrt" in missing_packages("tensorrt")
    problem = backend_problem("tensorrt")
    assert "\n" not in problem and "'tensorrt'" in problem
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        require_backend("tensorrt")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        importlib.import_module("linewatch.runtime.tensorrt_backend")

    from linewatch.config import ConfigError, parse

    with pytest.raises(ConfigError) as err:
        parse('[engine]\nkind = "zeroshot"\nbackend = "tensorrt"\n', tmp_path / "c.toml")
    assert len(err.value.lines) == 1
    line = err.value.lines[0]
    assert "c.toml:3" in line and "engine.backend" in line and "'tensorrt'" in line
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"only its existence is checked here")
    with pytest.raises(ConfigError) as err:  # the DQFormer engine's backend is checked the same way
        parse(f'[engine]\nkind = "dqformer"\ncheckpoint = "{ckpt}"\nbackend = "tensorrt"\ndevice = "cuda"\n',
              tmp_path / "d.toml")
    assert len(err.value.lines) == 1 and "d.toml:4: engine.backend = 'tensorrt'" in err.value.lines[0]
    with pytest.raises(ConfigError) as err:  # and TensorRT without a GPU device is refused by name
        parse(f'[engine]\nkind = "dqformer"\ncheckpoint = "{ckpt}"\nbackend = "tensorrt"\n', tmp_path / "e.toml")
    assert any("runs on a GPU" in line for line in err.value.lines)


def test_torch_and_onnxruntime_need_nothing_extra_here():
    assert missing_packages("torch") == [] and backend_problem("onnxruntime") is None
    with pytest.raises(ValueError):
        missing_packages("openvino")


def test_the_weights_hash_is_of_the_weights_loaded_not_the_file_now_on_disk(tmp_path):
    """Regression: the export hashed the checkpoint file after loading it. A checkpoint replaced
    in between (a deploy during the export) recorded the new file's hash for the old weights, and
    every later start took that export for current."""
    import torch

    import hashlib

    from linewatch.runtime.models import file_hash

    spec = get_spec("ard")
    ckpt = tmp_path / "ard.pt"
    first = spec.build(spec.resolve({"checkpoint": ""}))
    torch.save(first.state_dict(), ckpt)
    loaded_bytes = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    params = spec.resolve({"checkpoint": str(ckpt)})
    loaded = spec.build(params)
    replaced = spec.build(spec.resolve({"checkpoint": ""}))
    torch.nn.init.normal_(replaced.head.weight, std=1.0)
    torch.save(replaced.state_dict(), ckpt)  # the deploy lands here
    assert spec.weights_hash(params, loaded) == loaded_bytes != file_hash(ckpt)
    assert spec.weights_hash(params, spec.build(params)) == file_hash(ckpt)  # a new build: the new file
