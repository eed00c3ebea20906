"""TensorRT backend on a real GPU: FP16 plan parity with torch, the plan cache (hit without a
rebuild, a new plan when a key field changes), CUDA graphs, INT8 calibration from a replay folder.

Skipped, with the reason, where tensorrt / pycuda / a CUDA GPU are missing (the CPU CI).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def _gpu_missing() -> str | None:
    for pkg in ("tensorrt", "pycuda"):
        if importlib.util.find_spec(pkg) is None:
            return f"needs the '{pkg}' package (pip install 'linewatch[gpu]') and a CUDA GPU"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "needs a CUDA GPU: none found"
    except Exception as exc:  # noqa: BLE001 - any driver failure means "no usable GPU here"
        return f"needs a CUDA GPU: the CUDA driver does not start ({exc})"
    return None


REASON = _gpu_missing()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

from linewatch.runtime.models import get_spec  # noqa: E402
from linewatch.runtime.tensorrt_backend import TrtExtractor, TrtRunner, ensure_plan  # noqa: E402

PARAMS = {"feature_dim": 64, "input_size": 256}
FP16_REL_ERR = 2e-2


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


@pytest.fixture(scope="module")
def engines_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def module():
    spec = get_spec("patch_features")
    return spec.build(spec.resolve(PARAMS))


@pytest.fixture(scope="module")
def fp16_plan(engines_dir):
    return ensure_plan("patch_features", PARAMS, engines_dir, opt_batch=4, max_batch=8, progress=False)


def test_fp16_plan_matches_torch(fp16_plan, module):
    plan, fields = fp16_plan
    assert plan.is_file() and fields.precision == "fp16"
    runner = TrtRunner(plan)
    for batch in (1, 4, 11):  # 11 > max batch 8: split in two calls
        x = np.random.default_rng(batch).standard_normal((batch, 3, 256, 256)).astype(np.float32)
        with torch.inference_mode():
            want = module(torch.from_numpy(x)).numpy()
        got = runner.run({"image": x})[0]
        assert got.shape == want.shape and rel_err(got, want) < FP16_REL_ERR


def test_plan_cache_hits_and_misses(fp16_plan, engines_dir):
    plan, fields = fp16_plan
    mtime = plan.stat().st_mtime_ns
    again, same = ensure_plan("patch_features", PARAMS, engines_dir, opt_batch=4, max_batch=8, progress=False)
    assert again == plan and same == fields and plan.stat().st_mtime_ns == mtime, "a current plan was rebuilt"
    other, f2 = ensure_plan("patch_features", PARAMS, engines_dir, opt_batch=2, max_batch=8, progress=False)
    assert other != plan and f2.profiles != fields.profiles


def test_cuda_graphs_give_the_same_features(fp16_plan):
    plan, _ = fp16_plan
    plain, graphed = TrtRunner(plan), TrtRunner(plan, cuda_graphs=True)
    x = np.random.default_rng(0).standard_normal((4, 3, 256, 256)).astype(np.float32)
    a = plain.run({"image": x})[0]
    for _ in range(3):  # capture, then replays
        b = graphed.run({"image": x})[0]
        np.testing.assert_array_equal(a, b)


def test_extractor_runs_in_the_zeroshot_engine(engines_dir):
    from linewatch.config import ZeroShotEngine as EngineCfg
    from linewatch.engines.zeroshot import ZeroShotEngine
    from linewatch.frames import FrameMeta

    eng = ZeroShotEngine(EngineCfg(backend="tensorrt", feature_dim=64, engines_dir=engines_dir), batch_size=4)
    assert isinstance(eng.extractor, TrtExtractor)
    ims = [np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8) for i in range(4)]
    out = eng.infer(ims, [FrameMeta(i, 0.0, "cam", 256, 256, lot_id="l") for i in range(4)])
    assert len(out) == 4 and all(np.isfinite(o.score_map).all() for o in out)
    assert sorted(eng.lot_closed("l")) == [0, 1, 2, 3]


def test_dqformer_engine_on_a_tensorrt_plan(engines_dir, tmp_path):
    """A DQFormer checkpoint (seeded, small) run by the engine on backend tensorrt: the plan is
    built from the checkpoint's export and its FP16 probabilities follow the torch engine's."""
    from linewatch.config import DQFormerEngine as EngineCfg
    from linewatch.engines.dqformer import DQFormerEngine
    from linewatch.frames import FrameMeta
    from linewatch.models.dqformer import DQFormer, DQFormerConfig, save_checkpoint
    from linewatch.models.text import TEXT_MODEL_NAME

    torch.manual_seed(0)
    ckpt = tmp_path / "gpu" / "last.pt"
    save_checkpoint(ckpt, DQFormer(DQFormerConfig(image_hw=(128, 128), dim=32, decoder_layers=2)).eval(),
                    TEXT_MODEL_NAME, {}, epoch=1)
    ref = DQFormerEngine(EngineCfg(checkpoint=ckpt))
    trt_eng = DQFormerEngine(EngineCfg(checkpoint=ckpt, backend="tensorrt", device="cuda:0",
                                       engines_dir=engines_dir))
    assert trt_eng.version == f"{ref.version}-trtfp16"
    ims = [np.random.default_rng(i).integers(0, 255, (160, 200, 3), dtype=np.uint8) for i in range(3)]
    metas = [FrameMeta(i, 0.0, "cam", 160, 200) for i in range(3)]
    for want, got in zip(ref.infer(ims, metas), trt_eng.infer(ims, metas)):
        assert np.abs(got.score_map - want.score_map).max() < 2e-2


def test_int8_plan_from_a_replay_folder(engines_dir, tmp_path, module):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(60, 200, (256, 256, 3), dtype=np.uint8)).save(tmp_path / f"f{i:03d}.png")
    plan, fields = ensure_plan("patch_features", PARAMS, engines_dir, opt_batch=4, max_batch=8, precision="int8",
                               calibration_folder=tmp_path, progress=False)
    assert fields.precision == "int8" and fields.calibration and plan.is_file()
    x = np.random.default_rng(5).standard_normal((2, 3, 256, 256)).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    got = TrtRunner(plan).run({"image": x})[0]
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9  # INT8: close in shape, not in digits
