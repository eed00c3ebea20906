"""`linewatch eval`: run labelled image folders through the daemon's engine and report metrics.

Lots are formed from the data set (``--lots group|size|magnetic``) and fed, in order, through
exactly the engine the daemon builds from the config (``infer`` in batches, then ``lot_closed``).
Methods:
- ``floor``: the baseline from the project's issue: plain lot mutual scoring on EfficientNet-Lite0
  features (stride-8 and stride-16 stages, no local aggregation), frames squashed to 256 x 256,
  each patch scored by the mean of its 30 % smallest nearest-patch distances to the other images
  of the lot, bilinear upsampling, image score = map maximum;
- ``coarse``: the engine's tier-2 (whole-lot) maps from ``lot_closed``;
- ``tier1``: the engine's streaming maps from ``infer``;
- ``refined``: the daemon's tier 2 with AnoRefiner (config ``[refine]``): each lot's coarse maps
  refined by the ARD trained (PGT) on the previous lot. The evaluation waits for each PGT round
  to finish before the next lot (the daemon uses whatever ARD is ready). ``--contaminate F`` makes
  a share F of every lot's pseudo-normal frames defective (chosen from the ground truth) to check
  that PGT tolerates defective "normal" frames. With ``refined``, ``coarse`` comes from the same
  engine pass;
- ``dqformer``: the DQFormer engine of the config named by ``--dqformer`` (its checkpoint, backend,
  prompts and recipes, as the daemon would run it), frame by frame: its probability map and its
  region score ``sum_i s_i * m_i``. A checkpoint records the images it was trained on; those
  frames are left out of its figures (``held_out``), and the report adds a table of every method
  on the same held-out frames, so the comparison is like for like.

Writes metrics.md, metrics.json, pr_curve.png, a gallery of best and worst cases and index.html to
``--out``. Pixel metrics are binned (see ``linewatch.metrics``). Where the data has several defect
kinds (magnetic_tile, MVTec AD) the report also breaks the figures down by kind, each kind's frames
against all defect-free frames, with the kind's share of the defect pixels: the pooled pixel-AP is
decided by the kinds that cover the most pixels (on magnetic_tile, *uneven*). It also shows where
each method's false alarms lie at its F1-max threshold (``eval_report.FALSE_ALARM_PLACES``), with the pixel-AP
that suppressing each place's false alarms would reach: AnoRefiner's decoder trims the halo near a
defect, so where that ceiling is low it has little to win (on magnetic_tile most false alarms are
whole hot regions of defect-free frames). An MVTec AD root
with several categories is evaluated one category at a time, as the benchmark is (each its own
lots, engine and PGT state: a category is a product), with a report folder per category and a
summary table of every category and the mean over them at the top.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import datasets as ds
from . import eval_report as rep
from . import metrics as mx
from .models import zeroshot as zs
from .models.backbone import preprocess, resize_uint8

logger = logging.getLogger(__name__)

METHODS = ("floor", "coarse", "tier1", "refined", "dqformer")
DEFAULT_METHODS = ("floor", "coarse", "tier1", "refined")  # dqformer needs --dqformer
FLOOR_SIZE = 256
FLOOR_TOPK = 0.3


class FloorBaseline:
    """The issue's floor (see the module docstring); scores one whole lot at a time."""

    name = "floor"

    def __init__(self, threads: int = 0):
        from .engines.zeroshot import TorchExtractor

        self.extractor = TorchExtractor(out_dim=0, aggregate=False, threads=threads)

    def score_lot(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        feats = []
        for s in range(0, len(images), 8):
            crops = np.stack([resize_uint8(im, FLOOR_SIZE, FLOOR_SIZE) for im in images[s:s + 8]])
            feats.extend(torch.from_numpy(f.copy()) for f in self.extractor(preprocess(crops).numpy()))
        grids = zs.lot_mutual_scores(feats, FLOOR_TOPK)
        out = []
        for im, g in zip(images, grids):
            m = zs.to_pixel_map(g, im.shape[0], im.shape[1], sigma_cells=0)
            out.append((m, float(m.max())))
        return out


@dataclass
class MethodResult:
    """Everything kept about one method's run: maps (float16), image scores, timing."""

    name: str
    maps: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    accumulator: mx.PixelAccumulator | None = None
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)  # defect kind -> metrics
    false_alarms: dict[str, dict[str, float]] = field(default_factory=dict)  # place -> figures
    frames: list[int] | None = None  # the frames (indices in run order) its figures use; None = all
    held_out: dict[str, float] = field(default_factory=dict)  # its metrics on the DQFormer's held-out frames

    def used(self, n: int) -> np.ndarray:
        """Indices of the frames this method's figures use, out of ``n``."""
        return np.arange(n) if self.frames is None else np.asarray(self.frames, dtype=int)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `linewatch eval`."""
    parser.add_argument("data", type=Path, help="data folder (kolektor, kinds, mvtec layouts)")
    parser.add_argument("--layout", default="auto", choices=["auto", "kolektor", "kinds", "mvtec"],
                        help="data layout (default: detect)")
    parser.add_argument("--lots", default="group", choices=["group", "size", "magnetic"],
                        help="group = one lot per natural group (a kolektor item); size = lots of "
                             "--lot-size, in a fixed shuffled order (--seed; --seed -1 keeps the data "
                             "set's order); magnetic = lots of --lot-size with ~10%% defective")
    parser.add_argument("--lot-size", type=int, default=32, help="frames per lot for size/magnetic")
    parser.add_argument("--seed", type=int, default=0,
                        help="shuffle seed for size/magnetic lots and an MVTec category's frames")
    parser.add_argument("--config", type=Path, default=None,
                        help="config.toml whose [engine] and [inspect] sections are used")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default reports/<data name>)")
    parser.add_argument("--limit-lots", type=int, default=0, help="only the first N lots (0 = all)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (dqformer needs --dqformer)")
    parser.add_argument("--dqformer", type=Path, default=None, metavar="CONFIG",
                        help="config.toml whose [engine] is kind = \"dqformer\" (checkpoint, backend, prompts, "
                             "recipes; [lots] recipe names the frames' recipe): the dqformer method")
    parser.add_argument("--gallery", type=int, default=4, help="best and worst cases shown per method")
    parser.add_argument("--contaminate", type=float, default=None,
                        help="refined: make this share of each lot's pseudo-normal frames defective "
                             "(from the ground truth); default: the zero-shot choice as in the daemon")


def _lots(args, samples: list[ds.Sample], layout: str = "") -> list[list[ds.Sample]]:
    if args.lots == "magnetic":
        return ds.magnetic_tile_lots(samples, lot_size=args.lot_size, seed=args.seed)
    if args.lots == "size":
        return ds.group_lots(samples, "size", args.lot_size, shuffle_seed=None if args.seed < 0 else args.seed)
    # an MVTec category's lot is its test folder, kind after kind. Streamed in that order, a
    # frame's tier-1 references (the frames just before it) show the same kind of defect, which
    # hides it; its frames go in a fixed shuffled order. A KolektorSDD item keeps its own order.
    return ds.group_lots(samples, "group", shuffle_seed=args.seed if layout == "mvtec" else None)


def _engine_config(path: Path | None):
    from . import config as cfgmod

    if path is None:
        return cfgmod.ZeroShotEngine(), cfgmod.InspectConfig().batch_size
    cfg = cfgmod.load(path)
    if cfg.engine.kind != "zeroshot":
        raise ValueError(f"{path}: [engine] kind = {cfg.engine.kind!r}: `linewatch eval` runs the zero-shot "
                         f"engine's methods (floor, coarse, tier1, refined); evaluate a DQFormer checkpoint "
                         f"with `linewatch train eval`")
    return cfg.engine, cfg.inspect.batch_size


def _refine_config(path: Path | None):
    from . import config as cfgmod

    return cfgmod.RefineConfig() if path is None else cfgmod.load(path).refine


class ContaminatingSelector:
    """Pseudo-normal choice for ``--contaminate``: as many frames as the daemon would pick, of which
    a share ``fraction`` (stochastically rounded per lot, at most the lot's defective frames) are
    defective frames drawn at random; the rest are the lowest-scored of the others."""

    def __init__(self, fraction: float, min_count: int, seed: int = 0):
        self.fraction = float(fraction)
        self.min_count = int(min_count)
        self.labels: dict[str, list[bool]] = {}  # lot id -> defective flags, set by the evaluation
        self.rng = np.random.default_rng(seed)
        self.picked = 0
        self.picked_defective = 0

    def __call__(self, lot_id: str, image_scores, fraction: float) -> list[int]:
        from .refine.pseudo import select_pseudo_normals

        labels = self.labels[lot_id]
        k = len(select_pseudo_normals(image_scores, fraction, self.min_count))
        want = self.fraction * k
        n_bad = int(want) + int(self.rng.random() < want - int(want))
        bad = [i for i, d in enumerate(labels) if d]
        chosen = [int(i) for i in self.rng.permutation(bad)[:n_bad]]
        rest = [i for i in np.argsort(np.asarray(image_scores), kind="stable") if int(i) not in chosen]
        chosen += [int(i) for i in rest[:k - len(chosen)]]
        self.picked += len(chosen)
        self.picked_defective += sum(labels[i] for i in chosen)
        return chosen


def dqformer_training_images(checkpoint: Path) -> set[tuple[str, str]] | None:
    """The ``datasets.image_key`` of every image a DQFormer checkpoint was trained on, from the list
    `linewatch train dqformer` records in it; None for a checkpoint without that list (written
    before it was recorded): its training images cannot be told apart."""
    blob = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    paths = blob.get("train_images") if isinstance(blob, dict) else None
    return None if paths is None else {ds.image_key(p) for p in paths}


def evaluate(lots: list[list[ds.Sample]], methods: list[str], engine_cfg, batch_size: int = 4,
             progress: bool = True, refine_cfg=None, contaminate: float | None = None,
             info: dict | None = None, dqformer_cfg=None,
             ) -> tuple[dict[str, MethodResult], list[ds.Sample], list[np.ndarray]]:
    """Run the lots through the methods; returns results, the samples and their GT masks in order.
    ``info`` (a dict), when given, receives facts about the run (PGT rounds, pseudo-normal purity).
    ``dqformer_cfg``: a whole config whose engine is the DQFormer (method ``dqformer``)."""
    from tqdm import tqdm

    from .engines.base import Tier2Unavailable
    from .engines.zeroshot import ZeroShotEngine
    from .frames import FrameMeta

    results = {m: MethodResult(m) for m in methods}
    floor = FloorBaseline(engine_cfg.threads) if "floor" in methods else None
    engine = (ZeroShotEngine(engine_cfg, batch_size=batch_size) if {"coarse", "tier1", "refined"} & set(methods)
              else None)
    dq, dq_train = None, None
    if "dqformer" in methods:
        if dqformer_cfg is None or dqformer_cfg.engine.kind != "dqformer":
            raise ValueError("method dqformer needs a config whose [engine] kind is \"dqformer\" (--dqformer)")
        from .engines import create_engine

        dq = create_engine(dqformer_cfg.engine, batch_size=batch_size)
        dq_train = dqformer_training_images(dqformer_cfg.engine.checkpoint)
        if info is not None:
            info["dqformer"] = {"version": dq.version, "training_images": None if dq_train is None else len(dq_train)}
    selector = None
    if engine is not None and "refined" in methods:
        from . import config as cfgmod

        refine_cfg = refine_cfg or cfgmod.RefineConfig()
        if contaminate is not None:
            selector = ContaminatingSelector(contaminate, refine_cfg.min_pseudo_normals, refine_cfg.seed)
        engine.enable_refinement(refine_cfg, selector=selector)
        engine.keep_coarse = True  # the coarse maps the refinement started from, for the "coarse" rows
    lot_labels: dict[str, list[bool]] = {}
    pgt_seconds = 0.0
    with_ard = 0  # frames refined by an ARD already trained on an earlier lot (the first lot has none)
    order: list[ds.Sample] = []
    masks: list[np.ndarray] = []
    frame_id = 0
    bar = tqdm(total=sum(len(lot) for lot in lots), unit="img", disable=not progress)
    for k, lot in enumerate(lots):
        images = [ds.load_image(s.image, 3) for s in lot]
        order.extend(lot)
        masks.extend(ds.load_mask(s.mask, im.shape[:2]) for s, im in zip(lot, images))
        if floor is not None:
            t0 = time.perf_counter()
            for m, sc in floor.score_lot(images):
                results["floor"].maps.append(m.astype(np.float16))
                results["floor"].scores.append(sc)
            results["floor"].seconds += time.perf_counter() - t0
        if dq is not None:
            t0 = time.perf_counter()
            for s in range(0, len(images), batch_size):
                batch = images[s:s + batch_size]
                metas = [FrameMeta(frame_id + i, time.time(), "eval", im.shape[0], im.shape[1], lot_id=f"lot{k}",
                                   recipe=dqformer_cfg.lots.recipe) for i, im in enumerate(batch)]
                for o in dq.infer(batch, metas):
                    results["dqformer"].maps.append(o.score_map.astype(np.float16))
                    results["dqformer"].scores.append(o.image_score)
            results["dqformer"].seconds += time.perf_counter() - t0
        if engine is not None:
            lot_id = f"lot{k}"
            lot_labels[lot_id] = [s.defective for s in lot]
            if selector is not None:
                selector.labels[lot_id] = lot_labels[lot_id]
            ids = []
            t0 = time.perf_counter()
            for s in range(0, len(images), batch_size):
                batch = images[s:s + batch_size]
                metas = [FrameMeta(frame_id + i, time.time(), "eval", im.shape[0], im.shape[1], lot_id=lot_id)
                         for i, im in enumerate(batch)]
                frame_id += len(batch)
                ids.extend(m.frame_id for m in metas)
                outs = engine.infer(batch, metas)
                if "tier1" in results:
                    for o in outs:
                        results["tier1"].maps.append(o.score_map.astype(np.float16))
                        results["tier1"].scores.append(o.image_score)
            t1 = time.perf_counter()
            if engine.refiner is not None and engine.refiner.current() is not None:
                with_ard += len(ids)
            try:
                tier2 = engine.lot_closed(lot_id)
            except Tier2Unavailable as exc:  # the daemon publishes it NOT_INSPECTED; here the run cannot go on
                raise ValueError(f"{exc}; evaluate with larger lots (--lots, --lot-size)") from None
            t2 = time.perf_counter()
            coarse = engine.last_coarse if engine.refiner is not None else tier2
            if engine.refiner is not None:
                engine.refiner.wait_idle()  # lot k+1 is refined by the ARD trained on lot k
                pgt_seconds += time.perf_counter() - t2
            if "tier1" in results:
                results["tier1"].seconds += t1 - t0
            missing = [i for i in ids if i not in tier2 or i not in coarse]
            if missing:
                raise RuntimeError(f"lot {lot_id}: no tier-2 output for frames {missing[:5]}")
            if "coarse" in results:
                results["coarse"].seconds += (t1 - t0) + (t2 - t1)
                for i in ids:
                    results["coarse"].maps.append(coarse[i].score_map.astype(np.float16))
                    results["coarse"].scores.append(coarse[i].image_score)
            if "refined" in results:  # the wait for PGT is not the refined maps' cost (pgt_seconds)
                results["refined"].seconds += t2 - t0
                for i in ids:
                    results["refined"].maps.append(tier2[i].score_map.astype(np.float16))
                    results["refined"].scores.append(tier2[i].image_score)
        bar.update(len(lot))
    bar.close()
    if engine is not None and engine.refiner is not None:
        r = engine.refiner
        used = [lot_labels[lid][i] for lid, idx in r.pseudo_normals.items() for i in idx]
        if info is not None:
            if not with_ard:
                logger.warning("no lot was refined by a trained ARD (each category or data set is one lot?): "
                               "the refined row is the coarse maps; evaluate in several lots (--lots size)")
            info.update({"refined_frames_with_ard": with_ard,
                         "pgt_rounds": r.trained, "pgt_failed": r.failed, "pgt_seconds": round(pgt_seconds, 1),
                         "pseudo_normal_defective_share": round(float(np.mean(used)), 4) if used else None,
                         "pseudo_normals_seen": len(used), "contaminate": contaminate,
                         "last_round": r.last_report})
        engine.close()
    if dq is not None:
        dq.close()
        if dq_train is not None:  # its training frames never count, in any table
            held = [i for i, s in enumerate(order) if ds.image_key(s.image) not in dq_train]
            kinds_held = {bool(s.defective) for s in (order[i] for i in held)}
            if kinds_held != {False, True} or not any(masks[i].any() for i in held):
                raise ValueError(f"the DQFormer checkpoint's held-out frames ({len(held)} of {len(order)}, the "
                                 f"rest in its training split) need defective frames with marked pixels and "
                                 f"defect-free frames: evaluate more of the data set")
            results["dqformer"].frames = held
            if info is not None:
                info["dqformer"]["left_out"] = len(order) - len(held)
    labels = np.array([s.defective for s in order])
    kinds = [s.kind for s in order]
    # the near-defect ring of each frame with a marked defect, computed once for all methods
    near = {i: mx.near_defect(g) for i, g in enumerate(masks) if g.any()}
    held = results["dqformer"].frames if "dqformer" in results else None
    for r in results.values():
        idx = r.used(len(order))
        lo = float(min(r.maps[i].min() for i in idx))
        hi = float(max(r.maps[i].max() for i in idx))
        by_kind = {k: mx.PixelAccumulator(lo, hi) for k in dict.fromkeys(kinds[i] for i in idx)}
        for i in idx:
            by_kind[kinds[i]].add(r.maps[i].astype(np.float32), masks[i], _places(masks[i], bool(labels[i]), near.get(i)))
        acc = mx.PixelAccumulator(lo, hi)
        for a in by_kind.values():
            acc = acc.merged(a)
        r.accumulator = acc
        scores = [r.scores[i] for i in idx]
        r.metrics = {**acc.result(), **mx.image_metrics(labels[idx], scores),
                     "seconds_per_image": r.seconds / max(len(order), 1)}
        r.by_kind = _kind_metrics(by_kind, [kinds[i] for i in idx], scores)
        r.false_alarms = acc.false_alarms()
        if held is not None:  # every method on the DQFormer's held-out frames: like for like
            if r.frames == held:
                r.held_out = dict(r.metrics)
            else:
                sub = mx.PixelAccumulator(lo, hi)
                for i in held:
                    sub.add(r.maps[i].astype(np.float32), masks[i])
                r.held_out = {**sub.result(), **mx.image_metrics(labels[held], [r.scores[i] for i in held]),
                              "seconds_per_image": r.metrics["seconds_per_image"]}
    return results, order, masks


def _places(mask: np.ndarray, defective: bool, near: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A frame's normal pixels by where they lie (see ``eval_report.FALSE_ALARM_PLACES``); ``near``: the
    mask's ``metrics.near_defect`` when already computed."""
    if mask.any():
        near = mx.near_defect(mask) if near is None else near
        return {"near_defect": near, "defective_frame": ~near}
    return {"defective_frame" if defective else "good_frame": np.ones(mask.shape, dtype=bool)}


def _kind_metrics(by_kind: dict[str, mx.PixelAccumulator], kinds: list[str],
                  scores: list[float]) -> dict[str, dict[str, float]]:
    """Per defect kind (when the data has more than one): its frames against all defect-free
    frames. ``pixel_share`` is the kind's share of all defect pixels: pooled pixel-AP is mostly
    decided by the kinds with the largest share. Empty for one kind or no defect-free frames."""
    defect_kinds = [k for k in by_kind if k != "good"]
    if len(defect_kinds) < 2 or "good" not in by_kind:
        return {}
    total = sum(int(by_kind[k].pos.sum()) for k in defect_kinds)
    good = by_kind["good"]
    out = {}
    for k in sorted(defect_kinds):
        acc = by_kind[k]
        sel = [i for i, kk in enumerate(kinds) if kk in (k, "good")]
        row = {"frames": float(kinds.count(k)), "pixel_share": float(acc.pos.sum()) / max(total, 1),
               **mx.image_metrics([kinds[i] == k for i in sel], [scores[i] for i in sel])}
        if acc.regions:  # a kind may have frames without any marked pixel
            row.update(acc.merged(good).result())
        out[k] = row
    return out


def _categories(samples: list[ds.Sample], layout: str) -> dict[str, list[ds.Sample]]:
    """The products evaluated apart: each MVTec AD category (its own lots, engine and PGT state,
    and its own figures, as the benchmark reports them); any other layout is one product."""
    if layout != "mvtec":
        return {"": samples}
    cats: dict[str, list[ds.Sample]] = {}
    for s in samples:
        cats.setdefault(s.group, []).append(s)
    return cats


def _report(args, out: Path, title: str, lots, methods, engine_cfg, batch_size, refine_cfg) -> dict:
    """Evaluate one product's lots and write its report folder; returns its metrics per method."""
    n_images = sum(len(lot) for lot in lots)
    print(f"{title}: {len(lots)} lots, {n_images} images, methods {methods}, "
          f"engine {engine_cfg.model_dump(mode='json')}")
    info: dict = {}
    t_start = time.perf_counter()
    results, order, masks = evaluate(lots, methods, engine_cfg, batch_size, refine_cfg=refine_cfg,
                                     contaminate=args.contaminate, info=info,
                                     dqformer_cfg=getattr(args, "dqformer_cfg", None))
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.array([s.defective for s in order])
    table = rep.metrics_table(results)
    title = f"linewatch eval: {title} ({len(lots)} lots, {n_images} images, lots={args.lots})"
    run_line = ""
    if "pgt_rounds" in info:
        run_line = (f"\nRefinement: {info['refined_frames_with_ard']} of {n_images} frames refined by an ARD "
                    f"trained on an earlier lot (the first lot has none; the rest of the refined row is the "
                    f"coarse maps); {info['pgt_rounds']} PGT rounds ({info['pgt_failed']} failed), "
                    f"{info['pgt_seconds']} s waiting for PGT; share of defective frames among the "
                    f"pseudo-normals used: {info['pseudo_normal_defective_share']} "
                    f"(--contaminate {info['contaminate']}). Wall time {info['wall_s']} s.\n")
    kinds_md = rep.kind_table(results)
    kinds_part = f"\n## By defect kind (its frames against all defect-free frames)\n\n{kinds_md}\n" if kinds_md else ""
    held_md = rep.metrics_table(results, held_out=True)
    held_note = ("The DQFormer checkpoint records no list of its training images (written before it was "
                 "recorded): its row may include frames it was trained on." if "dqformer" in results and not held_md
                 else "")
    if held_md:
        kinds_part = f"\n## {rep.HELD_OUT_TITLE}\n\n{held_md}\n" + kinds_part
    elif held_note:
        kinds_part = f"\n{held_note}\n" + kinds_part
    alarms_md = rep.false_alarm_table(results)
    if alarms_md:
        kinds_part += f"\n## {rep.FALSE_ALARM_TITLE}\n\n{rep.FALSE_ALARM_NOTE}\n\n{alarms_md}\n"
    (out / "metrics.md").write_text(f"# {title}\n\n{table}\n\nPixel metrics binned over "
                                    f"{mx.DEFAULT_BINS} score bins; AUPRO to FPR {mx.AUPRO_FPR_LIMIT}.\n"
                                    + run_line + kinds_part, encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps({
        "data": str(args.data), "lots": args.lots, "n_lots": len(lots), "n_images": n_images,
        "engine": engine_cfg.model_dump(mode="json"), "batch_size": batch_size,
        "refine": refine_cfg.model_dump(mode="json") if "refined" in methods else None, "run": info,
        "methods": {r.name: r.metrics for r in results.values()},
        "by_kind": {r.name: r.by_kind for r in results.values() if r.by_kind},
        "false_alarms": {r.name: r.false_alarms for r in results.values()},
        "held_out": {r.name: r.held_out for r in results.values() if r.held_out}}, indent=2), encoding="utf-8")
    rep.pr_plot(results, labels, out / "pr_curve.png")
    cases = rep.gallery(results, order, masks, out, args.gallery)
    rep.index_html(out, title, table, kinds_md, alarms_md, cases, held_md, held_note)
    print(table)
    if held_note:
        print(held_note)
    if held_md:
        print(f"{rep.HELD_OUT_TITLE}:\n{held_md}")
    for md in (kinds_md, alarms_md):
        if md:
            print(md)
    if info:
        print("run:", json.dumps({k: v for k, v in info.items() if k != "last_round"}))
    print(f"report written to {out}/index.html")
    return {r.name: r.metrics for r in results.values()}


def run(args) -> int:
    """Entry point of `linewatch eval`; returns the process exit code."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        return 2
    try:
        layout = ds.detect_layout(args.data) if args.layout == "auto" else args.layout
        samples = ds.list_samples(args.data, layout)
    except (OSError, ValueError) as exc:  # a missing folder, an unreadable or corrupt mask (PIL's
        # UnidentifiedImageError is an OSError)
        print(f"cannot read data: {exc}")
        return 2
    categories = {}
    for name, cat_samples in _categories(samples, layout).items():
        n_bad = sum(1 for smp in cat_samples if smp.defective)
        if n_bad == 0 or n_bad == len(cat_samples):  # no metric is defined: say so before any inference
            where = f"{args.data}" + (f" / {name}" if name else "")
            print(f"cannot evaluate {where} ({layout} layout): {n_bad} defective and "
                  f"{len(cat_samples) - n_bad} defect-free images; it needs both, with ground truth")
            return 2
        lots = _lots(args, cat_samples, layout)
        if args.limit_lots:
            lots = lots[:args.limit_lots]
        if not lots:
            print(f"no lots formed from the data{f' of category {name}' if name else ''}")
            return 2
        categories[name] = lots
    engine_cfg, batch_size = _engine_config(args.config)
    refine_cfg = _refine_config(args.config)
    args.dqformer_cfg = None
    if "dqformer" in methods:
        from . import config as cfgmod

        if getattr(args, "dqformer", None) is None:
            print("method dqformer needs --dqformer CONFIG (a config whose [engine] kind is \"dqformer\")")
            return 2
        args.dqformer_cfg = cfgmod.load_or_report(args.dqformer)
        if args.dqformer_cfg is None:
            return 2
        if args.dqformer_cfg.engine.kind != "dqformer":
            print(f"{args.dqformer}: [engine] kind = {args.dqformer_cfg.engine.kind!r}, not \"dqformer\"")
            return 2
    out = args.out or Path("reports") / Path(args.data).name
    per_category = {}
    unreadable = _unreadable([s for lots in categories.values() for lot in lots for s in lot])
    if unreadable:
        print(f"cannot read data: {len(unreadable)} image(s) or mask(s) cannot be decoded or do not match, "
              f"e.g. {unreadable[0]}; fix or remove them")
        return 2
    for name, lots in categories.items():
        title = f"{args.data}" + (f" / {name}" if name else "")
        per_category[name] = _report(args, out / name if name else out, title, lots, methods, engine_cfg,
                                     batch_size, refine_cfg)
    if len(per_category) > 1 or "" not in per_category:
        rep.summary(out, args.data, per_category)
    return 0


def _unreadable(samples: list[ds.Sample]) -> list[str]:
    """What would stop the run part-way, found before any inference: an image or mask that does
    not decode, or a mask of another size than its image (one line each, naming the file)."""
    bad = []
    for s in samples:
        try:
            img = ds.load_image(s.image, 1)  # its error names the image
        except ValueError as exc:
            bad.append(str(exc))
            continue
        try:
            ds.load_mask(s.mask, img.shape[:2])
        except (OSError, ValueError, SyntaxError) as exc:
            bad.append(f"{s.mask}: {exc}")
    return bad


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m linewatch.evaluate``) until the CLI wires it."""
    parser = argparse.ArgumentParser(prog="linewatch eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
