"""Training loop for DQFormer, and the ``linewatch train dqformer`` / ``train build-refer`` commands.

When the backbone's low part (stem .. stride 8) is frozen (``--freeze stride8`` or ``all``, the
default), its outputs are computed once per training image and cached (float16); each step then
runs only the stride-16/32 stages, LMA, the pixel decoder and the query transformer. Flips are
applied to the cached features and masks (an approximation of flipping the image).

Checkpoints: ``<out>/last.pt`` after every epoch (model, optimizer, epoch, RNG seed, config, text
model name, metrics so far); ``--resume`` continues from it. ``<out>/metrics.json`` holds the
final evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..models.backbone import preprocess
from ..models.dqformer import DQFormer, DQFormerConfig, FREEZE_CHOICES, dqformer_loss, save_checkpoint
from ..models.text import TextEncoder, TEXT_MODEL_NAME
from . import data as rdata
from .evaluate import evaluate

logger = logging.getLogger(__name__)


def parse_hw(text: str) -> tuple[int, int]:
    """``256`` -> (256, 256); ``192x512`` -> (192, 512) (height x width)."""
    parts = str(text).lower().split("x")
    try:
        hw = (int(parts[0]), int(parts[-1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None
    if len(parts) > 2 or hw[0] % 32 or hw[1] % 32 or min(hw) <= 0:
        raise argparse.ArgumentTypeError(f"image size sides must be positive multiples of 32: {text!r}")
    return hw


@torch.no_grad()
def cache_levels(model: DQFormer, items: list[rdata.ReferItem], device: torch.device,
                 with_high: bool, batch_size: int = 16) -> list[torch.Tensor]:
    """Backbone features of every item, float16 on the CPU: [c4, c8] or [c4, c8, c16, c32]."""
    out: list[list[torch.Tensor]] = []
    model.backbone.eval()
    for a in range(0, len(items), batch_size):
        x = preprocess(np.stack([it.image for it in items[a:a + batch_size]])).to(device)
        levels = list(model.backbone.low(x))
        if with_high:
            levels += list(model.backbone.high(levels[1]))
        out.append([t.half().cpu() for t in levels])
    return [torch.cat(ts) for ts in zip(*out)]


# image-aware prompt templates (linewatch.prompts) mixed into training with --tag-prob, so that
# sentences carrying measured image tags ("... on the dark smooth magnetic tile") stay in
# distribution for the dqformer engine's IAP-AS prompts
TAG_TEMPLATES = ("{defect} on the {brightness} {texture} {product}", "{defect} on the {texture} {product}",
                 "{defect} on the {brightness} {product}", "{defect} on the {orientation} {texture} {product}")
PRODUCTS = {"magnetic_tile": "magnetic tile", "kolektorsdd": "commutator", "synthetic": "part"}


def with_tags(sentence: str, tags, product: str, rng: random.Random) -> str:
    """``sentence`` rewritten through a random image-aware template with the image's tags: its
    defect phrase (the part before " on the ") becomes {defect}. Spatial sentences stay as is."""
    from ..prompts import compose

    if " area" in sentence:
        return sentence
    phrase = sentence.split(" on the ", 1)[0]
    return compose([rng.choice(TAG_TEMPLATES)], [phrase], product, "", tags)[0]


_H_WORDS = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_V_WORDS = {"top": "bottom", "bottom": "top", "upper": "lower", "lower": "upper",
            "topmost": "bottommost", "bottommost": "topmost"}
_POSITION_WORD = re.compile(r"\b(" + "|".join(sorted({*_H_WORDS, *_V_WORDS}, key=len, reverse=True)) + r")\b",
                            re.IGNORECASE)


def flip_sentence(sentence: str, horizontal: bool, vertical: bool) -> str:
    """The sentence for the image mirrored left-right (``horizontal``) and/or top-bottom: its
    position words swapped (left <-> right, top <-> bottom, upper <-> lower), case kept."""
    if not (horizontal or vertical):
        return sentence

    def swap(m: re.Match) -> str:
        word = m.group(0)
        low = word.lower()
        new = (_H_WORDS.get(low) if horizontal else None) or (_V_WORDS.get(low) if vertical else None)
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new

    return _POSITION_WORD.sub(swap, sentence)


def _check_resume(blob: dict, doc: dict, train_paths: list[str], ckpt_path: Path) -> None:
    """A resumed run must train on the split it started on: another data set, split seed or
    training set would leave the checkpoint trained on images it does not list as its training
    images (and an evaluation would score them as held out)."""
    had = blob.get("train_images")
    for what, before, now in (("data set", blob.get("data_name"), doc.get("name", "")),
                              ("split seed", blob.get("split_seed"), doc.get("seed"))):
        if before is not None and before != now:
            raise ValueError(f"--resume: {ckpt_path} was trained on {what} {before!r}, this run uses {now!r}; "
                             f"train into a new --out folder")
    if had is not None and sorted(had) != train_paths:
        raise ValueError(f"--resume: {ckpt_path} was trained on another training split "
                         f"({len(had)} images, {len(set(had) - set(train_paths))} not in this one); "
                         f"train into a new --out folder")


def _flip(t: torch.Tensor, h: bool, v: bool) -> torch.Tensor:
    dims = ([-1] if h else []) + ([-2] if v else [])
    return t.flip(dims) if dims else t


def train(doc: dict, out_dir: Path, epochs: int, config: DQFormerConfig, device: str = "cpu",
          batch_size: int = 8, lr: float = 1e-3, backbone_lr: float = 1e-4, seed: int = 0,
          universal_prob: float = 0.3, negative_prob: float = 0.15, resume: bool = False,
          eval_every: int = 0, progress: bool = True, max_steps: int = 0, tag_prob: float = 0.0,
          product: str | None = None) -> dict:
    """Train on ``doc``'s train split, evaluate on its test split; returns the final metrics.

    ``max_steps`` > 0 stops early (for tests). ``tag_prob``: share of training sentences rewritten
    with the image's measured tags (:func:`with_tags`; ``product`` defaults from the data name). Returns ``{"losses": [...per-step], "eval": {...}}``.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    dev = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "last.pt"

    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs} (an untrained checkpoint would load as a model)")
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint to resume at {ckpt_path}")
    model = DQFormer(config).to(dev)
    start_epoch, history = 0, []
    blob = None
    if resume:
        blob = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
        model.load_state_dict(blob["state_dict"])
        start_epoch = int(blob.get("epoch", 0))
        history = list(blob.get("history", []))
        logger.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    t0 = time.monotonic()
    # recorded in the checkpoint: an evaluation of the checkpoint leaves these images out
    train_paths = sorted({smp["image"] for smp in doc["samples"] if smp["split"] == "train"})
    if blob is not None:  # before any image is loaded
        _check_resume(blob, doc, train_paths, ckpt_path)
    train_items = rdata.load_items(doc, "train", config.image_hw)
    test_items = rdata.load_items(doc, "test", config.image_hw)
    if not train_items:
        raise rdata.ReferDataError("no training samples in the data document")
    kinds = {k: v for k, v in doc["kind_sentences"].items() if v}
    universal = list(doc["universal_prompts"])
    text = TextEncoder(max_tokens=config.max_tokens)
    all_sents = sorted({s for it in train_items for s in it.sentences}
                       | {s for v in kinds.values() for s in v} | set(universal))
    text.encode(all_sents)  # fill the cache once
    logger.info("data: %d train, %d test images, %d sentences (%.1f s)", len(train_items),
                len(test_items), len(all_sents), time.monotonic() - t0)

    cached = config.freeze in ("all", "stride8")
    if cached:
        t1 = time.monotonic()
        cache = cache_levels(model, train_items, dev, with_high=config.freeze == "all")
        logger.info("cached %d backbone levels of %d images in %.1f s", len(cache),
                    len(train_items), time.monotonic() - t1)
    masks_all = torch.from_numpy(np.stack([it.mask for it in train_items]))
    tags = []
    if tag_prob > 0:
        from ..prompts import measure_tags

        tags = [measure_tags(it.image) for it in train_items]
        product = product or PRODUCTS.get(doc.get("name", ""), "part")

    bb_params = [p for p in model.backbone.parameters() if p.requires_grad]
    head_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": head_params, "lr": lr}]
    if bb_params:
        groups.append({"params": bb_params, "lr": backbone_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_items) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    if blob is not None and "optimizer" in blob:
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])

    losses: list[float] = []
    step = 0
    for epoch in range(start_epoch, epochs):
        model.train()
        order = list(range(len(train_items)))
        rng.shuffle(order)
        bar = tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not progress, leave=False)
        ep_loss = []
        for a in bar:
            idx = order[a:a + batch_size]
            picks = [rdata.pick_sentence(train_items[i], rng, kinds, universal, universal_prob,
                                         negative_prob) for i in idx]
            if tag_prob > 0:
                picks = [(with_tags(s, tags[i], product, rng) if rng.random() < tag_prob else s, k)
                         for (s, k), i in zip(picks, idx)]
            hf, vf = rng.random() < 0.5, rng.random() < 0.5
            # a mirrored image is described mirrored: "top left" on the flipped target is "top right"
            enc = text.encode([flip_sentence(s, hf, vf) for s, _ in picks]).to(dev)
            keep = torch.tensor([k for _, k in picks], dtype=torch.float32)[:, None, None]
            target = masks_all[idx].float() * keep
            target = _flip(target, hf, vf).to(dev)
            if cached:
                levels = [_flip(c[idx].float(), hf, vf).to(dev) for c in cache]
                fwd = model.forward_from_levels if len(levels) == 4 else model.forward_from_low
                logits = fwd(*levels, enc.tokens, enc.mask, enc.pooled)
            else:
                x = preprocess(np.stack([train_items[i].image for i in idx]))
                logits = model(_flip(x, hf, vf).to(dev), enc.tokens, enc.mask, enc.pooled)
            loss, parts = dqformer_loss(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            ep_loss.append(losses[-1])
            bar.set_postfix(loss=f"{losses[-1]:.3f}", dice=f"{parts['dice']:.3f}")
            step += 1
            if max_steps and step >= max_steps:
                break
        rec = {"epoch": epoch + 1, "loss": float(np.mean(ep_loss)), "elapsed_s": time.monotonic() - t0}
        if eval_every and (epoch + 1) % eval_every == 0 and epoch + 1 < epochs and test_items:
            rec["eval"] = evaluate(model, text, test_items, kinds, dev)
            model.train()
        history.append(rec)
        logger.info("epoch %d: loss %.4f (%.0f s)", epoch + 1, rec["loss"], rec["elapsed_s"])
        save_checkpoint(ckpt_path, model, TEXT_MODEL_NAME, {"history": history}, epoch=epoch + 1,
                        history=history, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        data_name=doc.get("name", ""), seed=seed, split_seed=doc.get("seed"),
                        train_images=train_paths)
        if max_steps and step >= max_steps:
            break
    if test_items:
        final = evaluate(model, text, test_items, kinds, dev)
    else:
        logger.warning("the data document has no test split: the checkpoint is not evaluated")
        final = {"test_samples": 0}
    final["train_time_s"] = time.monotonic() - t0
    save_checkpoint(ckpt_path, model, TEXT_MODEL_NAME, {"history": history, "final": final},
                    epoch=history[-1]["epoch"] if history else 0, history=history,
                    optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                    data_name=doc.get("name", ""), seed=seed, split_seed=doc.get("seed"),
                    train_images=train_paths)
    (out_dir / "metrics.json").write_text(json.dumps({"history": history, "final": final}, indent=1),
                                          encoding="utf-8")
    return {"losses": losses, "eval": final, "history": history}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``linewatch train dqformer``."""
    parser.add_argument("--data", required=True,
                        help="referring JSON file (from build-refer), or a data set name "
                             "(magnetic_tile, kolektorsdd) built on the fly from ../shared/data")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder (last.pt, metrics.json)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--image-size", type=parse_hw, default=(256, 256), help="N or HxW, multiples of 32")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backbone-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared, busy machine)")
    parser.add_argument("--freeze", choices=FREEZE_CHOICES, default="all",
                        help="all: frozen backbone; stride8: fine-tune strides 16/32; none: all")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=3, help="query transformer layers")
    parser.add_argument("--universal-prob", type=float, default=0.3)
    parser.add_argument("--negative-prob", type=float, default=0.15,
                        help="share of steps with a wrong-kind sentence and an empty target")
    parser.add_argument("--tag-prob", type=float, default=0.0,
                        help="share of training sentences rewritten with measured image tags "
                             "(IAP-AS templates, e.g. 'a crack on the dark smooth magnetic tile')")
    parser.add_argument("--product", default=None,
                        help="{product} word for --tag-prob (default from the data name)")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N epochs (0: end only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """``linewatch train dqformer``: returns the exit code."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    doc = rdata.load(args.data, seed=args.seed)
    cfg = DQFormerConfig(image_hw=args.image_size, dim=args.dim, decoder_layers=args.layers,
                         freeze=args.freeze)
    res = train(doc, args.out, args.epochs, cfg, device=args.device, batch_size=args.batch_size,
                lr=args.lr, backbone_lr=args.backbone_lr, seed=args.seed,
                universal_prob=args.universal_prob, negative_prob=args.negative_prob,
                resume=args.resume, eval_every=args.eval_every, progress=not args.no_progress,
                tag_prob=args.tag_prob, product=args.product)
    print(json.dumps(res["eval"], indent=1))
    return 0


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``linewatch train build-refer``."""
    parser.add_argument("--dataset", required=True, choices=sorted(rdata.BUILDERS) + ["synthetic"])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--root", type=Path, default=None,
                        help="data set folder (default ../shared/data/<dataset>); for synthetic, "
                             "the folder the frames are written to (default beside --out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--n-free", type=int, default=None, help="defect-free images to include")
    parser.add_argument("--n-frames", type=int, default=200, help="synthetic: frames to generate")


def run_build(args: argparse.Namespace) -> int:
    """``linewatch train build-refer``: write a referring JSON; returns the exit code."""
    if args.dataset == "synthetic":
        root = args.root or args.out.with_suffix("")
        doc = rdata.build_synthetic(root, n_frames=args.n_frames, seed=args.seed,
                                    test_fraction=args.test_fraction)
    else:
        root = args.root or rdata.shared_data_root() / args.dataset
        kw = {"n_free": args.n_free} if args.n_free is not None else {}
        doc = rdata.BUILDERS[args.dataset](root, seed=args.seed, test_fraction=args.test_fraction, **kw)
    rdata.save(doc, args.out)
    n = {sp: sum(s["split"] == sp for s in doc["samples"]) for sp in rdata.SPLITS}
    print(f"wrote {args.out}: {len(doc['samples'])} samples ({n['train']} train, {n['test']} test)")
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The whole ``linewatch train`` command: subcommands ``dqformer``, ``build-refer``, ``eval``."""
    sub = parser.add_subparsers(dest="train_cmd", required=True)
    s = sub.add_parser("dqformer", help="train the DQFormer referring segmenter")
    add_arguments(s)
    s.set_defaults(train_fn=run)
    s = sub.add_parser("build-refer", help="build a referring data JSON (magnetic_tile, kolektorsdd, synthetic)")
    add_build_arguments(s)
    s.set_defaults(train_fn=run_build)
    from . import evaluate as revaluate

    s = sub.add_parser("eval", help="evaluate a DQFormer checkpoint on a referring split (mIoU, "
                                    "precision@k, wrong-kind sentence test), optionally draw the figure")
    revaluate.add_arguments(s)
    s.set_defaults(train_fn=revaluate.run)


def run_train(args: argparse.Namespace) -> int:
    """Dispatch ``linewatch train <sub>``; returns the exit code."""
    return args.train_fn(args)
