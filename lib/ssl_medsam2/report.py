"""The evaluation report as one PNG: what a reader needs to judge label quality at a glance.

Top row: the best, median and worst case (by mean Dice over classes), each on the slice with the
most ground-truth foreground, ground truth drawn as solid contours and the prediction as dashed
contours in the same class colour. Bottom: per-class Dice (bars = mean, dots = cases) and HD95.
"""

from __future__ import annotations

import io as _io
import os
from pathlib import Path

import numpy as np

from .io import Volume, atomic_write, load_volume
from .preprocess import IntensityConfig, resolve_slice_axis, scale_to_uint8_range

CLASS_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def pick_cases(per_case: dict) -> list[tuple[str, str]]:
    """[(title, case)] for the best, median and worst case by mean Dice (fewer if fewer cases)."""
    ranked = sorted(per_case, key=lambda n: (-per_case[n]["mean_dice"], n))
    if not ranked:
        return []
    picks = [("best", ranked[0]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[-1])]
    seen, out = set(), []
    for title, name in picks:
        if name not in seen:
            seen.add(name)
            out.append((title, name))
    return out


def _slice_view(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2D slice displayed with the first in-plane axis horizontal (transposed for imshow)."""
    return np.take(vol, index, axis=axis).T


def write_report(result: dict, pairs: dict[str, tuple[Volume, Volume]], path: str | os.PathLike,
                 images: dict[str, Path] | None = None, intensity: IntensityConfig | None = None) -> Path:
    """``images`` (case -> image path) gives the overlays a background, windowed by ``intensity`` (the
    caller's config, so ``--config`` / ``--set input.*`` reach the report); both or neither."""
    if images and intensity is None:
        raise ValueError("write_report: an image background needs the intensity windowing (input: section)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = result["classes"]
    names = [result["class_names"][str(c)] for c in classes]
    picks = pick_cases(result["per_case"])
    fig = plt.figure(figsize=(5 * max(3, len(picks)), 10), dpi=100)
    gs = fig.add_gridspec(2, max(3, len(picks)), height_ratios=[1.25, 1])
    for col, (title, case) in enumerate(picks):
        ax = fig.add_subplot(gs[0, col])
        pred, gt = pairs[case]
        axis = resolve_slice_axis("auto", gt.spacing)
        fg = (gt.array > 0).sum(axis=tuple(a for a in range(3) if a != axis))
        idx = int(np.argmax(fg))
        bg = None
        if images and case in images:
            try:
                img = load_volume(images[case], name=case)
                if img.shape == gt.shape:
                    bg = scale_to_uint8_range(img.array, intensity)
            except Exception:  # the report must not fail for a background image
                bg = None
        sp = [s for a, s in enumerate(gt.spacing) if a != axis]
        extent_aspect = sp[1] / sp[0]
        if bg is not None:
            ax.imshow(_slice_view(bg, axis, idx), cmap="gray", origin="lower", aspect=extent_aspect)
        else:
            ax.imshow(np.zeros_like(_slice_view(gt.array, axis, idx), dtype=float), cmap="gray",
                      origin="lower", aspect=extent_aspect, vmin=0, vmax=1)
        for k, c in enumerate(classes):
            colour = CLASS_COLOURS[k % len(CLASS_COLOURS)]
            g = _slice_view(gt.array == c, axis, idx).astype(float)
            p = _slice_view(pred.array == c, axis, idx).astype(float)
            if g.any():
                ax.contour(g, levels=[0.5], colors=[colour], linewidths=1.6, origin="lower")
            if p.any():
                ax.contour(p, levels=[0.5], colors=[colour], linewidths=1.6, linestyles="dashed", origin="lower")
        dice = result["per_case"][case]["classes"]
        txt = ", ".join(f"{n} {dice[n]['dice']:.2f}" for n in names if n in dice)
        ax.set_title(f"{title}: {case} (mean Dice {result['per_case'][case]['mean_dice']:.3f})\n"
                     f"slice {idx} of axis {axis}\n{txt}", fontsize=9)
        if axis == 2:
            ax.invert_xaxis()  # axial slices in radiological view: the patient's right on the left
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], color=CLASS_COLOURS[k % len(CLASS_COLOURS)], label=n) for k, n in enumerate(names)]
    handles += [plt.Line2D([], [], color="k", label="ground truth (solid)"),
                plt.Line2D([], [], color="k", linestyle="dashed", label="prediction (dashed)")]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False)

    rows = result["rows"]
    x = np.arange(len(classes))
    ax = fig.add_subplot(gs[1, : max(3, len(picks)) // 2 + 1])
    means = [result["per_class"][n]["dice"]["mean"] or 0.0 for n in names]
    ax.bar(x, means, color=[CLASS_COLOURS[k % len(CLASS_COLOURS)] for k in range(len(classes))], alpha=0.6)
    for k, c in enumerate(classes):
        vals = [r["dice"] for r in rows if r["class_id"] == c]
        ax.scatter(np.full(len(vals), k) + np.linspace(-0.15, 0.15, len(vals)), vals, color="k", s=12, zorder=3)
        ax.text(k, min(1.02, means[k] + 0.03), f"{means[k]:.3f}", ha="center", fontsize=9)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice per class ({result['n_cases']} cases; bar = mean, dots = cases)")
    ax.grid(axis="y", alpha=0.3)
    ax2 = fig.add_subplot(gs[1, max(3, len(picks)) // 2 + 1:])
    hd_means = [result["per_class"][n]["hd95_mm"]["mean"] for n in names]
    ax2.bar(x, [h or 0.0 for h in hd_means], color=[CLASS_COLOURS[k % len(CLASS_COLOURS)] for k in range(len(classes))],
            alpha=0.6)
    for k, c in enumerate(classes):
        vals = [r["hd95_mm"] for r in rows if r["class_id"] == c and r["hd95_mm"] is not None]
        if vals:
            ax2.scatter(np.full(len(vals), k) + np.linspace(-0.15, 0.15, len(vals)), vals, color="k", s=12, zorder=3)
        ax2.text(k, (hd_means[k] or 0.0), "n/a" if hd_means[k] is None else f"{hd_means[k]:.1f}", ha="center",
                 va="bottom", fontsize=9)
    ax2.set_xticks(x, names)
    ax2.set_ylabel("HD95 (mm, lower is better)")
    ax2.set_title("HD95 per class")
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
