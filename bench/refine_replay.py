"""Replay a data set's tier-2 lots through AnoRefiner, fast, to study PGT settings.

`linewatch eval --methods coarse,refined` spends most of its time on the zero-shot engine. This
tool runs that part once (``cache``: the same lots and engine as `linewatch eval`, each closed
lot's hand-over to PGT kept on disk with the ground truth), then replays the lots through the
daemon's ``Refiner`` as often as wanted (``run``): lot k refined by the ARD trained on lot k-1,
then PGT on lot k, waiting for each round as the evaluation does. It prints coarse (the baseline,
from the same replay) against refined:

- pixel-AUROC / pixel-AP / AUPRO / F1-max over all frames; the pixel-AP were every false alarm near
  a defect suppressed (``ap_without_near``: the most that trimming halos, the ARD's main work,
  could reach; see `linewatch eval`'s false-alarm breakdown); and pixel-AP over defective frames
  only (localisation where there is something to find, without the false alarms of good frames);
- pixel-AP on fresh synthetic anomalies pasted into the last lot's pseudo-normals (what PGT
  optimises): a refined figure that rises here while the real one falls means the decoder learned
  the synthesis, not the defects.

    python bench/refine_replay.py cache ../shared/data/kolektorsdd --out var/replay/kolektor.pkl
    python bench/refine_replay.py run var/replay/kolektor.pkl --config bench/eval-refine.toml \\
        [--contaminate 0.1] [--set steps=60 --set samples_per_lot=16]

``run`` uses the ``[refine]`` section of ``--config`` (``--set`` overrides single keys) and the
``[engine]`` section for the feature extractor of the synthetic samples. Results depend on the
thread count (floating-point order changes the training path): ``--threads`` (default 1) is
recorded in the output.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linewatch import config as cfgmod  # noqa: E402
from linewatch import datasets as ds  # noqa: E402
from linewatch import evaluate as ev  # noqa: E402
from linewatch import metrics as mx  # noqa: E402
from linewatch.refine import worker  # noqa: E402

PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1max")


def cache(args) -> int:
    """Run the engine over the lots once; keep every LotJob handed to PGT and the ground truth."""
    jobs: list[worker.LotJob] = []
    worker.Refiner.submit = lambda self, job: jobs.append(job)  # keep, do not train
    worker.Refiner.wait_idle = lambda self, timeout_s=None: True
    samples = ds.list_samples(args.data, "auto")
    lots = ev._lots(argparse.Namespace(lots=args.lots, lot_size=args.lot_size, seed=args.seed), samples)
    cfg = cfgmod.load(args.config)
    results, order, masks = ev.evaluate(lots, ["coarse", "refined"], cfg.engine, cfg.inspect.batch_size,
                                        refine_cfg=cfg.refine, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as f:
        pickle.dump({"data": str(args.data), "lots": args.lots, "engine": cfg.engine.model_dump(mode="json"),
                     "jobs": jobs, "masks": [np.packbits(m) for m in masks], "shapes": [m.shape for m in masks],
                     "labels": [s.defective for s in order]}, f, protocol=4)
    print(f"{len(jobs)} lots, {len(order)} frames cached to {args.out}; coarse "
          + json.dumps({k: round(results['coarse'].metrics[k], 4) for k in PIXEL_KEYS}))
    return 0


def _metrics(maps: list[np.ndarray], masks: list[np.ndarray], labels=None) -> dict[str, float]:
    """Pixel metrics; with the frames' ``labels``, also the pixel-AP were the false alarms near
    defects suppressed (``ap_without_near``: what trimming halos could reach at most)."""
    lo = float(min(m.min() for m in maps))
    hi = float(max(m.max() for m in maps))
    acc = mx.PixelAccumulator(lo, hi)
    for k, (m, g) in enumerate(zip(maps, masks)):
        acc.add(m.astype(np.float32), g, None if labels is None else ev._places(g, bool(labels[k])))
    res = acc.result()
    out = {k: round(float(res[k]), 4) for k in PIXEL_KEYS}
    near = acc.false_alarms().get("near_defect") if labels is not None else None
    if near is not None:
        out["ap_without_near"] = round(near["ap_without"], 4)
    return out


def _synthetic_ap(refiner: worker.Refiner, job: worker.LotJob, extract, cfg, n: int = 24) -> tuple[float, float]:
    """Pixel-AP of the coarse and the current ARD's maps on ``n`` fresh synthetic anomalies."""
    from sklearn.metrics import average_precision_score

    from linewatch.models.backbone import preprocess
    from linewatch.refine.pseudo import select_pseudo_normals
    from linewatch.refine.synth import make_samples

    normals = select_pseudo_normals(job.image_scores, cfg.pseudo_normal_fraction, cfg.min_pseudo_normals)
    samples = make_samples(job.images, job.feats, job.refs, job.z, normals, job.scale, n, extract, refiner.scorer,
                           np.random.default_rng(12345), references=cfg.references, normal_share=0.0,
                           drawn_share=cfg.drawn_share)
    ard = refiner.current()
    coarse, refined = [], []
    with torch.inference_mode():
        for s in samples:
            img, feat, z = preprocess(s.image[None]), s.feat[None], s.z[None, None]
            coarse.append(refiner._base(img, feat, z)[0, 0].numpy().ravel())
            module = ard.module if ard is not None else refiner._base
            refined.append(module(img, feat, z)[0, 0].numpy().ravel())
    y = np.concatenate([s.mask.ravel() for s in samples])
    return (float(average_precision_score(y, np.concatenate(coarse))),
            float(average_precision_score(y, np.concatenate(refined))))


def run(args) -> int:
    """Replay the cached lots through the Refiner; print coarse vs refined."""
    from linewatch.engines.zeroshot import ZeroShotEngine

    torch.set_num_threads(args.threads)
    with open(args.cache, "rb") as f:
        d = pickle.load(f)
    jobs, labels = d["jobs"], np.array(d["labels"])
    masks = [np.unpackbits(p)[:int(np.prod(s))].reshape(s).astype(bool) for p, s in zip(d["masks"], d["shapes"])]
    full = cfgmod.load(args.config)
    updates = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        if key not in type(full.refine).model_fields:
            print(f"unknown [refine] key {key!r}")
            return 2
        updates[key] = value
    cfg = type(full.refine).model_validate({**full.refine.model_dump(), **updates})
    engine = ZeroShotEngine(full.engine.model_copy(update={"threads": args.threads}))
    selector = None
    if args.contaminate is not None:
        selector = ev.ContaminatingSelector(args.contaminate, cfg.min_pseudo_normals, cfg.seed)
    refiner = worker.Refiner(cfg, jobs[0].feats[0].shape[0], engine.features, engine.scorer, selector=selector,
                             skip_sigma=engine.smooth_cells)
    coarse, refined = [], []
    i, t0, train_s = 0, time.perf_counter(), 0.0
    for job in jobs:
        n = len(job.images)
        shapes = [m.shape for m in masks[i:i + n]]
        for out, ard in ((coarse, None), (refined, refiner.current())):
            maps = refiner.refine(job.images, job.feats, job.z, ard)
            out.extend(refiner.to_frame(m, *s).astype(np.float16) for m, s in zip(maps, shapes))
        if selector is not None:
            selector.labels[job.lot_id] = [bool(x) for x in labels[i:i + n]]
        ts = time.perf_counter()
        refiner._round(job)
        train_s += time.perf_counter() - ts
        i += n
    bad = [k for k, lab in enumerate(labels) if lab]
    rows = {
        "coarse": {**_metrics(coarse, masks, labels), "ap_defective_frames": _metrics([coarse[k] for k in bad],
                                                                              [masks[k] for k in bad])["pixel_ap"]},
        "refined": {**_metrics(refined, masks, labels), "ap_defective_frames": _metrics([refined[k] for k in bad],
                                                                                [masks[k] for k in bad])["pixel_ap"]},
    }
    syn = _synthetic_ap(refiner, jobs[-1], engine.features, cfg)
    rows["coarse"]["synthetic_ap"], rows["refined"]["synthetic_ap"] = round(syn[0], 4), round(syn[1], 4)
    keys = list(rows["coarse"])
    print(f"\n{d.get('data', args.cache)} ({len(jobs)} lots, {len(labels)} frames), [refine] overrides {updates or 'none'}, "
          f"contaminate {args.contaminate}, threads {args.threads}, PGT {refiner.trained} rounds in {train_s:.0f} s "
          f"(wall {time.perf_counter() - t0:.0f} s)\n")
    print("| method | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    if refiner.pseudo_normals:
        starts = dict(zip((job.lot_id for job in jobs), np.cumsum([0] + [len(job.images) for job in jobs])))
        used = [labels[starts[lid] + j] for lid, idx in refiner.pseudo_normals.items() for j in idx]
        print(f"\ndefective share among the pseudo-normals of the last {len(refiner.pseudo_normals)} lots: "
              f"{np.mean(used):.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="run the engine once and keep each lot's PGT hand-over")
    c.add_argument("data", type=Path)
    c.add_argument("--lots", default="group", choices=["group", "size", "magnetic"])
    c.add_argument("--lot-size", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--config", type=Path, default=Path("bench/eval-refine.toml"))
    c.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="replay cached lots through the Refiner")
    r.add_argument("cache", type=Path)
    r.add_argument("--config", type=Path, default=Path("bench/eval-refine.toml"))
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a [refine] key")
    r.add_argument("--contaminate", type=float, default=None)
    r.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    return cache(args) if args.cmd == "cache" else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
