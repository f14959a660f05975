"""Draw the README's picture of the loop: a few labels -> pseudo labels -> nnU-Net rounds -> a deployed model.

Run from the repository root: ``python docs/figures/loop.py`` (writes docs/figures/loop.png).
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, text, face colour)
    "labels": (1.0, 2.0, "a few labelled\nvolumes\n(annotators)", "#d8ecd3"),
    "fewshot": (4.0, 2.0, "few-shot pseudo labels\nfor all the others\n(SAM2 or atlas, no training)", "#dbe7f5"),
    "nnunet": (7.0, 2.0, "nnU-Net round k\ntrains on labels +\npseudo labels", "#f6e3c8"),
    "gate": (10.0, 2.0, "quality gate:\nbetter on a held-out\nlabelled case?", "#f3d6d6"),
    "deployed": (10.0, 0.2, "deployed model\n(/infer/nnunet, predict)", "#e4dcf1"),
    "next": (4.0, 0.2, "next volume to label:\nmost uncertain pseudo label", "#eeeeee"),
}
ARROWS = [  # (from, side, to, side, label, curvature); sides: l r t b
    ("labels", "r", "fewshot", "l", "supports", 0.0),
    ("fewshot", "r", "nnunet", "l", "round 0", 0.0),
    ("nnunet", "r", "gate", "l", "", 0.0),
    ("gate", "b", "deployed", "t", "yes: deploy", 0.0),
    ("gate", "t", "nnunet", "t", "yes: its refined pseudo labels train round k+1", 0.45),
    ("deployed", "l", "next", "r", "rank by uncertainty / disagreement", 0.0),
    ("next", "l", "labels", "b", "annotate", -0.35),
]
W, H = 2.4, 1.1


def main(out: Path = Path(__file__).with_name("loop.png")) -> None:
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=110)
    ax.set_xlim(-0.3, 11.3)
    ax.set_ylim(-0.5, 3.6)
    ax.axis("off")
    for x, y, text, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x - W / 2, y - H / 2), W, H, boxstyle="round,pad=0.05",
                                    facecolor=colour, edgecolor="#444444"))
        ax.text(x, y, text, ha="center", va="center", fontsize=9)
    for a, side_a, b, side_b, label, curve in ARROWS:
        start, end = _anchor(a, side_a), _anchor(b, side_b)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="#333333",
                                     connectionstyle=f"arc3,rad={curve}", shrinkA=2, shrinkB=2))
        if label:
            mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
            vertical = start[0] == end[0]
            dy = 0.55 * curve * abs(end[0] - start[0]) if curve > 0 else (0.1 if not vertical else 0.0)
            ax.text(mx + (0.1 if vertical else 0), my + dy, label, ha="left" if vertical else "center",
                    va="bottom" if not vertical else "center", fontsize=8, color="#333333")
    ax.set_title("SSL-MedSAM2: from a few labels to a deployed model", fontsize=11)
    fig.tight_layout()
    fig.savefig(out)
    print(out)


def _anchor(box: str, side: str) -> tuple[float, float]:
    """The middle of one side of a box: l(eft), r(ight), t(op) or b(ottom)."""
    x, y = BOXES[box][:2]
    return {"l": (x - W / 2, y), "r": (x + W / 2, y), "t": (x, y + H / 2), "b": (x, y - H / 2)}[side]


if __name__ == "__main__":
    main()
