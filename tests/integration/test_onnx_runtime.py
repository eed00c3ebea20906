"""ONNX export + ONNX Runtime: numerical parity with torch for every registered model, the
manifest / staleness round trip, and the zero-shot engine end to end on backend=onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from linewatch.runtime.export import check_onnx, ensure_onnx, export_onnx
from linewatch.runtime.manifest import manifest_path, read_manifest
from linewatch.runtime.models import MODELS, get_spec
from linewatch.runtime.ort_backend import OrtRunner

pytestmark = pytest.mark.integration

# small but real settings per model (real ImageNet backbone weights; DQFormer head untrained)
PARITY_PARAMS = {
    "patch_features": {"feature_dim": 0, "input_size": 256, "context": True},  # both levels
    "dqformer": {"input_size": 128},
    "ard": {"feat_dim": 64, "input_size": 128, "raise_max": 1.0},  # both sides of the peak bound
}
MAX_REL_ERR = 1e-4  # the issue asks for "well under 1e-3" in fp32


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (scale-free, robust to near-zero entries)."""
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def test_every_registered_model_has_parity_params():
    """Guards against a model added to the registry (ARD, say) without a parity check."""
    assert set(PARITY_PARAMS) == set(MODELS)


@pytest.mark.parametrize("model", sorted(PARITY_PARAMS))
def test_onnxruntime_matches_torch(model, tmp_path):
    spec = get_spec(model)
    params = spec.resolve(PARITY_PARAMS[model])
    module = spec.build(params)
    path, manifest = export_onnx(model, params, tmp_path, module=module)
    assert manifest.model == model and manifest.opset >= 17
    assert [t.name for t in manifest.inputs] == list(spec.input_names)
    assert all(t.shape[0] == "batch" for t in manifest.inputs + manifest.outputs)
    runner = OrtRunner(path, threads=2, manifest=manifest)
    for batch in (1, 3):  # the export example had batch 2: both sides of it must work
        inputs = spec.example_inputs(module, params, batch)
        with torch.inference_mode():
            want = module(*inputs).numpy()
        got = runner.run({n: t.numpy() for n, t in zip(spec.input_names, inputs)})[0]
        assert got.shape == want.shape
        assert rel_err(got, want) < MAX_REL_ERR, f"{model} batch {batch}: rel err {rel_err(got, want):.2e}"


def test_manifest_round_trip_and_staleness(tmp_path):
    params = {"feature_dim": 32, "input_size": 128}
    path, _ = export_onnx("patch_features", params, tmp_path)
    assert check_onnx("patch_features", params, tmp_path)[1] is None
    same, m = ensure_onnx("patch_features", params, tmp_path)
    assert same == path and m.params["feature_dim"] == 32

    # weights changed since the export (as after a new weights file): stale, and re-exported
    mp = manifest_path(path)
    raw = json.loads(mp.read_text())
    mp.write_text(json.dumps({**raw, "weights_hash": "0000000000"}))
    assert "weights hash changed" in check_onnx("patch_features", params, tmp_path)[1]
    _, m2 = ensure_onnx("patch_features", params, tmp_path)
    assert m2.weights_hash == raw["weights_hash"]
    assert check_onnx("patch_features", params, tmp_path)[1] is None

    # a replaced ONNX file no longer matches its manifest
    path.write_bytes(path.read_bytes() + b"\0")
    assert "does not match" in check_onnx("patch_features", params, tmp_path)[1]
    # another parameter set is another file
    other, _ = check_onnx("patch_features", {**params, "feature_dim": 16}, tmp_path)
    assert other != path
    assert read_manifest(tmp_path / "missing.json") is None


def test_dynamic_image_size_export(tmp_path):
    params = {"feature_dim": 16, "input_size": 128, "dynamic_size": True}
    spec = get_spec("patch_features")
    module = spec.build(spec.resolve(params))
    path, m = export_onnx("patch_features", params, tmp_path, module=module)
    assert m.inputs[0].shape == ["batch", 3, "height", "width"]
    runner = OrtRunner(path, threads=2, manifest=m)
    x = np.random.default_rng(1).standard_normal((2, 3, 96, 160)).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    got = runner.run({"image": x})[0]
    assert got.shape == (2, 16, 12, 20) and rel_err(got, want) < MAX_REL_ERR


def test_zeroshot_engine_on_onnxruntime_end_to_end(tmp_path):
    """The daemon's default engine on backend=onnxruntime: exported on first use, then tier 1 and
    tier 2 give the same maps as the torch backend (to fp32 rounding)."""
    from linewatch.config import ZeroShotEngine as EngineCfg
    from linewatch.engines.zeroshot import ZeroShotEngine
    from linewatch.frames import FrameMeta

    rng = np.random.default_rng(0)
    base = rng.integers(90, 160, (1, 192, 256, 3)).astype(np.uint8)
    images = [np.clip(base[0] + rng.normal(0, 4, base.shape[1:]), 0, 255).astype(np.uint8) for _ in range(5)]
    images[3][80:90, 40:200] = 255  # a bright scratch
    kw = dict(threads=2, feature_dim=32, reference_frames=4, input_size=128, engines_dir=tmp_path)
    ort_eng = ZeroShotEngine(EngineCfg(backend="onnxruntime", **kw))
    assert list(tmp_path.glob("*.onnx")), "the backbone should have been exported on first use"
    torch_eng = ZeroShotEngine(EngineCfg(backend="torch", **kw))
    assert ort_eng.version == torch_eng.version

    def run(eng):
        out = []
        for s in (0, 3):
            chunk = images[s:s + 3]
            metas = [FrameMeta(s + i, 0.0, "cam", 192, 256, lot_id="lot1") for i in range(len(chunk))]
            out += eng.infer(chunk, metas)
        return out, eng.lot_closed("lot1")

    (t1_ort, t2_ort), (t1_torch, t2_torch) = run(ort_eng), run(torch_eng)
    assert sorted(t2_ort) == list(range(5))
    for a, b in zip(t1_ort + [t2_ort[i] for i in range(5)], t1_torch + [t2_torch[i] for i in range(5)]):
        assert a.score_map.shape == (192, 256) and a.score_map.dtype == np.float32
        assert np.isfinite(a.score_map).all()
        assert rel_err(a.score_map, b.score_map) < 1e-3
        assert abs(a.image_score - b.image_score) <= 1e-3 * max(abs(b.image_score), 1e-6)
    assert t2_ort[3].score_map[80:90, 40:200].max() > np.percentile(t2_ort[3].score_map, 99)
    # a second engine reuses the export (no rewrite)
    mtime = next(tmp_path.glob("*.onnx")).stat().st_mtime_ns
    ZeroShotEngine(EngineCfg(backend="onnxruntime", **kw))
    assert next(tmp_path.glob("*.onnx")).stat().st_mtime_ns == mtime


def test_engines_cli_export_and_list(tmp_path, capsys):
    from linewatch.cli import main

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[engine]\nkind = "zeroshot"\nbackend = "onnxruntime"\nfeature_dim = 16\ninput_size = 128\n'
                   f'engines_dir = "{tmp_path / "engines"}"\n')
    assert main(["engines", "export", "--config", str(cfg)]) == 0
    assert "exported" in capsys.readouterr().out
    assert main(["engines", "export", "--config", str(cfg)]) == 0
    assert "current" in capsys.readouterr().out
    assert main(["engines", "list", "--config", str(cfg)]) == 0
    assert "current" in capsys.readouterr().out
    assert main(["engines", "export", "--config", str(cfg), "--model", "nope"]) == 1


def test_unwritable_engines_dir_names_the_export_command(tmp_path):
    """Guards against a bare OSError traceback when the daemon cannot export on first use."""
    from linewatch.config import ZeroShotEngine as EngineCfg
    from linewatch.engines import EngineUnavailable
    from linewatch.engines.zeroshot import ZeroShotEngine

    blocker = tmp_path / "engines"
    blocker.write_text("a file where the engines folder should be")
    with pytest.raises(EngineUnavailable, match="linewatch engines export"):
        ZeroShotEngine(EngineCfg(backend="onnxruntime", feature_dim=16, input_size=128, engines_dir=blocker))
