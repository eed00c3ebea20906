"""The report of `linewatch eval`: Markdown tables (metrics per method, on the DQFormer's held-out
frames, by defect kind, where the false alarms lie, per category), the precision-recall plot, the
gallery of best and worst cases and the HTML pages that show them. What is measured lives in
:mod:`linewatch.evaluate`; this module only writes it down."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import numpy as np

from . import datasets as ds
from . import metrics as mx

if TYPE_CHECKING:
    from .evaluate import MethodResult

METRIC_KEYS = ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1max", "image_auroc", "image_ap", "image_f1max")
# where a false alarm lies: near a marked defect (within ``metrics.near_defect``: the halo a
# patch-level map spreads around a defect, what AnoRefiner's decoder trims), elsewhere on a frame
# with a defect, or on a defect-free frame
FALSE_ALARM_PLACES = ("near_defect", "defective_frame", "good_frame")


def metrics_table(results: dict[str, MethodResult], held_out: bool = False) -> str:
    """Markdown table of the metrics, one row per method (``held_out``: on the DQFormer's held-out
    frames; empty when there are none). A method whose figures leave frames out says how many."""
    if held_out and not any(r.held_out for r in results.values()):
        return ""
    head = "| method | " + " | ".join(METRIC_KEYS) + " | s/image |"
    sep = "|" + "---|" * (len(METRIC_KEYS) + 2)
    rows = [head, sep]
    for r in results.values():
        m = r.held_out if held_out else r.metrics
        cells = [f"{m[k]:.4f}" for k in METRIC_KEYS]
        name = r.name if held_out or r.frames is None else f"{r.name} ({len(r.frames)} held-out frames)"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {m['seconds_per_image']:.3f} |")
    return "\n".join(rows)


HELD_OUT_TITLE = "On the DQFormer checkpoint's held-out frames (every method, the same frames)"


KIND_KEYS = ("pixel_auroc", "pixel_ap", "aupro", "image_auroc")


def kind_table(results: dict[str, MethodResult]) -> str:
    """Markdown table of the per-defect-kind metrics (empty when there are none)."""
    # every method's kinds: one that leaves frames out (dqformer) may lack a kind the others have
    kinds = list(dict.fromkeys(k for r in results.values() for k in r.by_kind))
    if not kinds:
        return ""
    rows = ["| kind | frames | share of defect pixels | method | " + " | ".join(KIND_KEYS) + " |",
            "|" + "---|" * (len(KIND_KEYS) + 4)]
    for k in kinds:
        for r in results.values():
            row = r.by_kind.get(k, {"frames": 0.0, "pixel_share": 0.0})
            cells = [f"{row[key]:.4f}" if key in row else "-" for key in KIND_KEYS]
            rows.append(f"| {k} | {int(row['frames'])} | {row['pixel_share']:.3f} | {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


FALSE_ALARM_TITLE = "Where the false alarms are"
FALSE_ALARM_NOTE = ("Each cell: the share of the normal pixels scored at or above the method's F1-max "
                    "threshold that lie there, and in brackets the pixel-AP if every false alarm there "
                    "were suppressed (a ceiling). AnoRefiner's decoder can only trim the halo near a "
                    "defect: where that ceiling is close to the pixel-AP, refinement has little to gain.")
PLACE_LABELS = {"near_defect": "near a defect", "defective_frame": "elsewhere on defective frames",
                "good_frame": "on defect-free frames"}


def false_alarm_table(results: dict[str, MethodResult]) -> str:
    """Markdown table of where each method's false alarms lie (empty when none was measured)."""
    if not any(r.false_alarms for r in results.values()):
        return ""
    rows = ["| method | pixel-AP | " + " | ".join(PLACE_LABELS[p] for p in FALSE_ALARM_PLACES) + " |",
            "|" + "---|" * (len(FALSE_ALARM_PLACES) + 2)]
    for r in results.values():
        cells = []
        for p in FALSE_ALARM_PLACES:
            fa = r.false_alarms.get(p)
            cells.append(f"{100 * fa['share_at_f1max']:.0f} % ({fa['ap_without']:.4f})" if fa else "-")
        rows.append(f"| {r.name} | {r.metrics['pixel_ap']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def pr_plot(results: dict[str, MethodResult], labels: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in results.values():
        tp, fp = r.accumulator.counts()
        axes[0].plot(tp / tp[-1], tp / np.maximum(tp + fp, 1), label=f"{r.name} (AP {r.metrics['pixel_ap']:.3f})")
        idx = r.used(len(labels))
        itp, ifp = mx._cumulative_counts(labels[idx], np.asarray(r.scores)[idx])
        axes[1].plot(itp / itp[-1], itp / (itp + ifp), label=f"{r.name} (AP {r.metrics['image_ap']:.3f})")
    for ax, title in zip(axes, ("pixel precision-recall", "image precision-recall")):
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(title)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlay(image: np.ndarray, score_map: np.ndarray, lo: float, hi: float) -> np.ndarray:
    from matplotlib import colormaps

    norm = np.clip((score_map.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    heat = (colormaps["jet"](norm)[..., :3] * 255).astype(np.float32)
    base = np.repeat(image[..., :1], 3, axis=2) if image.shape[2] == 1 else image
    return (0.55 * base.astype(np.float32) + 0.45 * heat).astype(np.uint8)


def gallery(results, order, masks, out: Path, n: int) -> dict[str, list[dict]]:
    """Best and worst cases per method: defective images ranked by the image-score rank, plus the
    defect-free images that scored highest (false alarms)."""
    from PIL import Image

    labels = np.array([s.defective for s in order])
    cases: dict[str, list[dict]] = {}
    for r in results.values():
        scores = np.asarray(r.scores)
        rank = scores.argsort().argsort() / max(len(scores) - 1, 1)  # 1 = highest score
        used = np.zeros(len(labels), dtype=bool)
        used[r.used(len(labels))] = True  # a method's left-out frames are never shown for it
        bad = np.flatnonzero(labels & used)
        good = np.flatnonzero(~labels & used)
        pick = [("best", i) for i in bad[np.argsort(-rank[bad])][:n]]
        pick += [("worst-missed", i) for i in bad[np.argsort(rank[bad])][:n]]
        pick += [("worst-false-alarm", i) for i in good[np.argsort(-rank[good])][:n]]
        hi = float(np.percentile(np.concatenate([r.maps[i].ravel()[::97] for i in np.flatnonzero(used)]), 99.9))
        lo = r.accumulator.lo
        folder = out / "gallery" / r.name
        folder.mkdir(parents=True, exist_ok=True)
        cases[r.name] = []
        for kind, i in pick:
            s = order[i]
            stem = f"{kind}_{s.group}_{s.image.parent.name}_{s.image.stem}"
            img = ds.load_image(s.image, 3)
            Image.fromarray(img).save(folder / f"{stem}_image.png")
            Image.fromarray(masks[i].astype(np.uint8) * 255).save(folder / f"{stem}_gt.png")
            Image.fromarray(overlay(img, r.maps[i], lo, hi)).save(folder / f"{stem}_pred.png")
            cases[r.name].append({"kind": kind, "image": str(s.image), "score": float(scores[i]),
                                  "rank": float(rank[i]), "stem": f"gallery/{r.name}/{stem}"})
    return cases


def md_table_html(md: str) -> str:
    """A Markdown table as written by this module (``metrics_table`` and the others) as HTML."""
    lines = [ln.strip().strip("|").split("|") for ln in md.splitlines() if not ln.startswith("|---")]
    cells = [[html.escape(c.strip()) for c in ln] for ln in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def page_head(title: str) -> str:
    """Start of a report page: title, styles and the heading."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border:1px solid #ccc}"
            "img{height:220px;margin:2px}table{border-collapse:collapse}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>")


def index_html(out: Path, title: str, table_md: str, kinds_md: str, alarms_md: str, cases, held_md: str = "",
                held_note: str = "") -> None:
    parts = [page_head(title) + md_table_html(table_md)]
    if held_md:
        parts.append(f"<h2>{HELD_OUT_TITLE}</h2>" + md_table_html(held_md))
    if held_note:
        parts.append(f"<p>{html.escape(held_note)}</p>")
    parts.append("<h2>Precision-recall</h2><img src='pr_curve.png' style='height:auto;max-width:100%'>")
    if kinds_md:
        parts.append("<h2>By defect kind</h2><p>Each kind's frames against all defect-free frames.</p>"
                     + md_table_html(kinds_md))
    if alarms_md:
        parts.append(f"<h2>{FALSE_ALARM_TITLE}</h2><p>{html.escape(FALSE_ALARM_NOTE)}</p>" + md_table_html(alarms_md))
    for name, items in cases.items():
        parts.append(f"<h2>Gallery: {html.escape(name)}</h2>")
        for c in items:
            parts.append(f"<div><b>{html.escape(c['kind'])}</b> {html.escape(c['image'])} score "
                         f"{c['score']:.3f} (rank {c['rank']:.2f})<br>"
                         + "".join(f"<img src='{html.escape(quote(c['stem']))}_{p}.png' title='{p}'>"
                                   for p in ("image", "gt", "pred")) + "</div>")
    parts.append("</body></html>")
    (out / "index.html").write_text("\n".join(parts), encoding="utf-8")


def category_means(per_category: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per method, the mean of each metric over the categories."""
    methods = list(next(iter(per_category.values())))
    return {m: {k: float(np.mean([per_category[c][m][k] for c in per_category])) for k in METRIC_KEYS}
            for m in methods}


def category_table(per_category: dict[str, dict[str, dict[str, float]]],
                   mean: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per category and method, then the mean over the categories."""
    rows = ["| category | method | " + " | ".join(METRIC_KEYS) + " |", "|" + "---|" * (len(METRIC_KEYS) + 2)]
    for cat, by_method in [*per_category.items(), (f"**mean of {len(per_category)}**", mean)]:
        for m, row in by_method.items():
            rows.append(f"| {cat} | {m} | " + " | ".join(f"{row[k]:.4f}" for k in METRIC_KEYS) + " |")
    return "\n".join(rows)


def summary(out: Path, data: Path, per_category: dict[str, dict[str, dict[str, float]]]) -> None:
    """The top-level report of a multi-category run: the category table and links to each report."""
    mean = category_means(per_category)
    table = category_table(per_category, mean)
    title = f"linewatch eval: {data} ({len(per_category)} categories, each evaluated apart)"
    (out / "metrics.md").write_text(f"# {title}\n\n{table}\n\nEach category's own report: "
                                    "<category>/metrics.md and <category>/index.html.\n", encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps({"data": str(data), "categories": per_category, "mean": mean},
                                                 indent=2), encoding="utf-8")
    # file names may hold '#', '?' or '%': quoted as URLs, then escaped as HTML
    links = "".join(f"<li><a href='{html.escape(quote(c))}/index.html'>{html.escape(c)}</a></li>" for c in per_category)
    (out / "index.html").write_text(page_head(title) + md_table_html(table)
                                    + f"<h2>Categories</h2><ul>{links}</ul></body></html>", encoding="utf-8")
    print(table)
    print(f"summary written to {out}/index.html")
