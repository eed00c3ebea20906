"""`linewatch eval` end to end on real magnetic_tile images laid out as an MVTec AD data set with
two categories: each category is evaluated apart (its own lots and report), the top-level report
tabulates the categories and their mean, and each category's report breaks its figures down by
defect kind. The images are linked from ../shared/data, not copied."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MT = ROOT.parent / "shared" / "data" / "magnetic_tile"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not MT.is_dir(), reason=f"magnetic_tile data not found at {MT}")]

KINDS = ("blowhole", "break")


def _mvtec_layout(root: Path) -> None:
    """Two categories of 10 defect-free + 2 + 2 defective real images, masks where MVTec keeps them."""
    free = sorted((MT / "free").glob("*.jpg"))
    for c, cat in enumerate(("tile_a", "tile_b")):
        good = root / cat / "test" / "good"
        good.mkdir(parents=True)
        for img in free[c * 10:(c + 1) * 10]:
            (good / img.name).symlink_to(img)
        for kind in KINDS:
            test, gt = root / cat / "test" / kind, root / cat / "ground_truth" / kind
            test.mkdir(parents=True)
            gt.mkdir(parents=True)
            for img in sorted((MT / kind).glob("*.jpg"))[c * 2:(c + 1) * 2]:
                (test / img.name).symlink_to(img)
                (gt / f"{img.stem}_mask.png").symlink_to(img.with_name(f"{img.stem}_mask.png"))


def test_eval_reports_each_category_apart_and_each_defect_kind(tmp_path):
    data, out = tmp_path / "mvtec", tmp_path / "report"
    _mvtec_layout(data)
    proc = subprocess.run([sys.executable, "-m", "linewatch", "eval", str(data), "--methods", "floor,coarse",
                           "--out", str(out), "--gallery", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    top = json.loads((out / "metrics.json").read_text())
    assert set(top["categories"]) == {"tile_a", "tile_b"}
    for method in ("floor", "coarse"):
        for key in ("pixel_auroc", "pixel_ap", "image_auroc"):
            values = [top["categories"][c][method][key] for c in ("tile_a", "tile_b")]
            assert all(0.0 <= v <= 1.0 for v in values)
            assert top["mean"][method][key] == pytest.approx(sum(values) / 2)
    assert "mean of 2" in (out / "metrics.md").read_text()
    assert "tile_a/index.html" in (out / "index.html").read_text()
    for cat in ("tile_a", "tile_b"):
        rep = json.loads((out / cat / "metrics.json").read_text())
        assert rep["n_images"] == 14 and rep["n_lots"] == 1  # one lot per category, nothing mixed
        coarse = rep["methods"]["coarse"]
        # the engine finds real blowholes and breaks on defect-free tiles of the same kind
        assert coarse["pixel_auroc"] > 0.8, coarse
        kinds = rep["by_kind"]["coarse"]
        assert set(kinds) == set(KINDS)
        assert sum(k["pixel_share"] for k in kinds.values()) == pytest.approx(1.0)
        assert all(k["frames"] == 2 for k in kinds.values())
        assert "By defect kind" in (out / cat / "index.html").read_text()
        # where the false alarms lie: every normal pixel in one place, each ceiling at least the AP
        for method in ("floor", "coarse"):
            places = rep["false_alarms"][method]
            assert set(places) == {"near_defect", "defective_frame", "good_frame"}
            assert sum(p["share_at_f1max"] for p in places.values()) == pytest.approx(1.0)
            assert all(p["ap_without"] >= rep["methods"][method]["pixel_ap"] - 1e-9 for p in places.values())
        assert "Where the false alarms are" in (out / cat / "index.html").read_text()
        assert (out / cat / "pr_curve.png").stat().st_size > 0
        assert list((out / cat / "gallery" / "coarse").glob("best_*_pred.png"))


def test_eval_with_another_engine_kind_is_a_one_line_error(tmp_path, capsys):
    from linewatch.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[engine]\nkind = "dqformer"\ncheckpoint = "{ROOT / "README.md"}"\n[metrics]\nport = 0\n')
    assert main(["eval", str(MT), "--lots", "magnetic", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "runs the zero-shot engine" in err and "Traceback" not in err


def test_eval_with_lots_too_small_to_judge_is_a_one_line_error(tmp_path, capsys):
    from linewatch.cli import main

    assert main(["eval", str(MT), "--lots", "size", "--lot-size", "2", "--methods", "coarse",
                 "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "too few to set its score scale" in err and "--lot-size" in err and "Traceback" not in err
