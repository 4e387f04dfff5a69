"""Pictures: how a model ranks (evaluation.py --plots) and how it attends (retrieve.py --explain).

None of the originals (SCAN, SGRAF, NAAF) draws anything; R@1/5/10 alone hide how a model
ranks. Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no backend
switch in the caller's process):

  evaluation.py --plots DIR   score_distributions.png  scores of matching and non-matching pairs
                              recall_at_k.png          recall@K, K = 1..100, both directions
                              rank_histogram.png       where the ground truth is ranked
                              (an ensemble: each model and the ensemble on the same axes)
  retrieve.py --explain OUT   attention_figure: for the query and each top result, the word x
                              region attention weights (a heatmap, one row per word), and each
                              word's most attended region drawn on the image when there are
                              boxes and image files

Nothing is written over a file these commands did not make (outputs.check_outputs, before any
compute): each PNG is written through outputs.atomic_output and recorded as its command's.
"""
import os
import textwrap

import numpy as np

import errors
import outputs

DPI = 100
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
# ground-truth rank bins of rank_histogram.png (1-based, inclusive lower edges)
RANK_EDGES = (1, 2, 3, 4, 5, 6, 11, 21, 51, 101, 201, 501, 1001, 5001)


# ----------------------------------------------------------------------------- files

def save(fig, path, tool, flag):
    """Write the figure as a PNG through outputs.atomic_output, recorded as `tool`'s, after
    checking again that it replaces nothing it should not (outputs.check_outputs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    if hasattr(path, "write"):  # a buffer (serve.py's answers are never written to a file)
        fig.savefig(path, format="png", dpi=DPI)
        return path
    outputs.check_outputs([path], tool, flag)
    try:
        with outputs.atomic_output(path, tool) as tmp:
            with open(tmp, "wb") as f:
                fig.savefig(f, format="png", dpi=DPI)
    except OSError as e:
        raise errors.error("output_unwritable", path, reason=errors.first_line(e)) from None
    return path


def _figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


# ----------------------------------------------------------------------------- evaluation

EVAL_FILES = ("score_distributions.png", "recall_at_k.png", "rank_histogram.png")


def eval_paths(out_dir):
    return [os.path.join(out_dir, name) for name in EVAL_FILES]


def evaluation_figures(curves, out_dir, where, tool="evaluation.py --plots", flag="--plots"):
    """The three figures of `evaluation.py --plots` into `out_dir`. `curves`: [(label, data)],
    data as evaluation.plot_data returns it (each model, then the ensemble); `where`: what was
    evaluated, e.g. "f30k_precomp test". Returns the paths written."""
    first = curves[0][1]
    n_img, n_cap = first["n_images"], first["n_captions"]
    scope = ("%s, COCO 1K: the five 1000-image folds (mean of the folds' recalls)" % where
             if first["fold5"] else "%s: %d images, %d captions" % (where, n_img, n_cap))
    figs = [_scores_figure(curves, scope), _recall_figure(curves, scope),
            _rank_figure(curves, scope)]
    return [save(fig, path, tool, flag) for fig, path in zip(figs, eval_paths(out_dir))]


def _scores_figure(curves, scope):
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    for k, (label, d) in enumerate(curves):
        c = COLOURS[k % len(COLOURS)]
        edges = d["edges"]
        for hist, mean, style, what in ((d["pos_hist"], d["pos_mean"], "-", "matching"),
                                        (d["neg_hist"], d["neg_mean"], "--", "non-matching")):
            n = hist.sum()
            dens = hist / max(n, 1) / np.diff(edges)
            ax.stairs(dens, edges, color=c, linestyle=style, linewidth=1.6,
                      label="%s: %s pairs (%s, mean %.3f)"
                            % (label, what, format(int(n), ","), mean))
    ax.set_xlabel("score (the model's similarity of an image and a caption)")
    ax.set_ylabel("density (share of pairs per unit of score)")
    ax.set_title("Scores of matching pairs (a caption and its own image) against all other "
                 "pairs\n" + scope, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _recall_figure(curves, scope):
    fig = _figure(12, 5)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, way, title in ((axes[0], "i2t", "image -> text: %d image queries, %d captions"),
                           (axes[1], "t2i", "text -> image: %d caption queries, %d images")):
        d0 = curves[0][1]
        n_q, n_g = ((d0["n_images"], d0["n_captions"]) if way == "i2t" else
                    (d0["n_captions"], d0["n_images"]))
        if d0["fold5"]:
            n_q, n_g = n_q // 5, n_g // 5
        for k, (label, d) in enumerate(curves):
            c = COLOURS[k % len(COLOURS)]
            ks, rec = d["k"], d["recall_" + way]
            marks = [int(np.searchsorted(ks, m)) for m in (1, 5, 10) if m <= ks[-1]]
            ax.plot(ks, rec, color=c, linewidth=1.6,
                    label="%s: R@1, R@5, R@10 = %s" % (label, ", ".join(
                        "%.1f" % rec[i] for i in marks)))
            ax.plot(ks[marks], rec[marks], "o", color=c, markersize=4)
        ax.set_xscale("log")
        ax.set_xlim(0.9, curves[0][1]["k"][-1] * 1.1)
        ax.set_ylim(0, 100)
        ax.set_xlabel("K (results looked at, log scale)")
        ax.set_title(title % (n_q, n_g) + (" in each fold" if d0["fold5"] else ""),
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("recall@K (% of queries with a match in the top K)")
    fig.suptitle("Recall@K, K = 1..%d (dots: the printed R@1, R@5, R@10)\n%s"
                 % (curves[0][1]["k"][-1], scope), fontsize=10)
    return fig


def rank_bins(n_max):
    """Bin edges (1-based ranks, inclusive lower edges; the last edge closes the last bin) and
    labels for ranks 1..n_max."""
    edges = [e for e in RANK_EDGES if e <= n_max] + [n_max + 1]
    labels = [str(a) if b - a == 1 else "%d-%d" % (a, b - 1)
              for a, b in zip(edges[:-1], edges[1:])]
    return np.array(edges), labels


def _rank_figure(curves, scope):
    fig = _figure(13, 5)
    axes = fig.subplots(1, 2)
    n = len(curves)
    for ax, way, title in (
            (axes[0], "i2t", "image -> text: rank of the best-ranked of the image's captions"),
            (axes[1], "t2i", "text -> image: rank of the caption's image")):
        d0 = curves[0][1]
        n_max = d0["n_captions"] if way == "i2t" else d0["n_images"]
        if d0["fold5"]:
            n_max //= 5
        edges, labels = rank_bins(n_max)
        x = np.arange(len(labels))
        width = 0.8 / n
        for k, (label, d) in enumerate(curves):
            ranks = d["ranks_" + way] + 1                    # 1 = the first result
            counts, _ = np.histogram(ranks, bins=edges)
            share = 100.0 * counts / len(ranks)
            ax.bar(x + (k - (n - 1) / 2) * width, share, width, color=COLOURS[k % len(COLOURS)],
                   label="%s (median rank %g)" % (label, np.floor(np.median(ranks))))
        ax.set_xticks(x, labels, rotation=45, fontsize=8)
        ax.set_xlabel("rank of the ground truth (1 = first result)")
        ax.set_ylabel("% of queries")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle("Where the ground truth is ranked\n" + scope, fontsize=10)
    return fig


# ----------------------------------------------------------------------------- attention

def attention_figure(rows, title, path, tool="retrieve.py --explain", flag="--explain"):
    """Draw and save the --explain figure. `rows`: one per result, each a list of panels:
    {"kind": "heatmap", "weights": (L, R), "words": [L labels], "title": str} or
    {"kind": "image", "image": (H, W[, C]) array, "boxes": [(x1, y1, x2, y2, label)],
    "title": str}; `title`: lines. Results are laid out side by side when their panels are
    few (up to 3 panels a line). Returns the heatmap arrays as drawn (rows = words)."""
    per = max(len(r) for r in rows)
    side = max(1, 3 // per)                                        # results per figure line
    lines = [rows[i:i + side] for i in range(0, len(rows), side)]
    ncols = per * side
    heights = [max(2.4, 0.22 * max([len(p["words"]) for r in line for p in r
                                    if p["kind"] == "heatmap"] or [8]) + 1.3)
               for line in lines]
    width = max(8.0, 5.5 * ncols)
    title = "\n".join(textwrap.fill(t, int(width * 12)) for t in title.split("\n"))
    fig = _figure(width, sum(heights) + 0.25 * (title.count("\n") + 1) + 0.3)
    grid = fig.add_gridspec(len(lines), ncols, height_ratios=heights)
    drawn = []
    for i, line in enumerate(lines):
        for k, row in enumerate(line):
            for j, panel in enumerate(row):
                ax = fig.add_subplot(grid[i, k * per + j])
                if panel["kind"] == "heatmap":
                    drawn.append(_heatmap(fig, ax, panel))
                else:
                    _image_panel(ax, panel)
    fig.suptitle(title, fontsize=10)
    save(fig, path, tool, flag)
    return drawn


def _heatmap(fig, ax, panel):
    w = np.asarray(panel["weights"], dtype=np.float64)              # (L, R)
    im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    words = panel["words"]
    ax.set_yticks(np.arange(len(words)), words, fontsize=8)
    R = w.shape[1]
    step = max(1, R // 12)
    ax.set_xticks(np.arange(0, R, step))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("region of the image")
    ax.set_ylabel("word")
    ax.set_title(panel["title"], fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label(
        "attention weight (each row sums to 1)", fontsize=7)
    return im.get_array().data


def _image_panel(ax, panel):
    from matplotlib.patches import Rectangle
    ax.imshow(panel["image"])
    for k, (x1, y1, x2, y2, label) in enumerate(panel["boxes"]):
        c = COLOURS[k % len(COLOURS)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c,
                               linewidth=1.8))
        ax.text(x1, y1, label, color="white", fontsize=7, va="bottom",
                bbox={"facecolor": c, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    ax.set_axis_off()
    ax.set_title(panel["title"], fontsize=9)
