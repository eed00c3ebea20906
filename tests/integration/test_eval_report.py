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


def test_the_refined_row_says_how_many_frames_a_trained_ard_refined():
    """The first lot of a run has no ARD yet; a data set that is one lot gets no refinement at all,
    and the report must say so rather than show coarse maps as 'refined'."""
    from linewatch import datasets as ds
    from linewatch.config import RefineConfig, ZeroShotEngine
    from linewatch.evaluate import evaluate

    samples = ds.list_samples(MT, "auto")
    good = [s for s in samples if not s.defective][:9]
    bad = [s for s in samples if s.defective and s.kind in KINDS][:3]
    lots = [good[k * 3:(k + 1) * 3] + [bad[k]] for k in range(3)]
    engine = ZeroShotEngine(threads=2, tier2_references=4)
    refine = RefineConfig(enabled=True, steps=8, samples_per_lot=4, batch_size=2, crop_px=32, width=4)
    info: dict = {}
    results, order, _ = evaluate(lots, ["coarse", "refined"], engine, refine_cfg=refine, info=info, progress=False)
    assert len(order) == 12 and info["pgt_rounds"] >= 1
    assert info["refined_frames_with_ard"] == 8  # lots 2 and 3, refined by the ARD of lots 1 and 2
    one: dict = {}
    evaluate([sum(lots, [])], ["coarse", "refined"], engine, refine_cfg=refine, info=one, progress=False)
    assert one["refined_frames_with_ard"] == 0


def test_eval_of_one_class_only_is_refused_before_any_inference(tmp_path, capsys):
    """Regression: a folder of defect-free images ran every engine, then failed on an undefined
    metric and wrote no report."""
    from linewatch.cli import main

    flat = tmp_path / "flat"
    flat.mkdir()
    for img in sorted((MT / "free").glob("*.jpg"))[:3]:
        (flat / img.name).symlink_to(img)
    assert main(["eval", str(flat), "--out", str(tmp_path / "r")]) == 2
    assert "0 defective and 3 defect-free images; it needs both" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_gallery_links_survive_file_names_with_url_characters(tmp_path):
    from linewatch import eval_report as rep

    case = {"kind": "best", "image": "part#12.png", "score": 1.0, "rank": 0.5,
            "stem": "gallery/coarse/best_g_f_part#12?a"}
    rep.index_html(tmp_path, "t", "| a |\n|---|\n| 1 |", "", "", {"coarse": [case]}, "", "")
    page = (tmp_path / "index.html").read_text()
    assert "src='gallery/coarse/best_g_f_part%2312%3Fa_image.png'" in page
