"""A simulated annotation campaign: how many clicks the pseudo labels leave to an annotator, against
clicking the same volumes from an empty label.

Campaign (per strategy): chaos_01 / chaos_02 are labelled. Each step the strategy picks the next volume of
the pool; its atlas pseudo label is computed from the current supports (the first pick reuses the cached
2-support labels of ``bench/interactive_cases.py``); the simulated annotator (the CVPR 2025 click rule,
``ssl_medsam2.interactive.simulate``) clicks each organ until Dice >= ``--target`` or ``--max-clicks``; the
corrected label is saved as final and joins the supports.

- ``uncertainty``: the volume whose 2-support pseudo label has the highest mean entropy inside the organs
  (the app's uncertainty score; ranked once from the cached run, because re-running the atlas on every
  candidate at every step costs ~100 CPU-s each).
- ``random``: a seeded random order.
- ``empty``: the same volumes clicked from an empty label (the cost without pseudo labels).

Clicks run in process through the same library calls as the server (``compose.organ_mask``); the HTTP
path is measured by ``bench/interactive.py``. Output: ``docs/figures/annotation_cost.{json,png}``; last
line JSON.

    PYTHONPATH=$PWD/lib nice -n 10 timeout 5400 python bench/annotation_cost.py --pool chaos_03 chaos_05 chaos_08 chaos_10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interactive_cases import SUPPORTS, passed_classes, pseudo_label_dir, support_appearance  # noqa: E402
from shared_data import CHAOS, REPO, chaos_cases  # noqa: E402

ORGANS = (1, 2, 3, 4)


def correct_volume(vol, truth: np.ndarray, start: np.ndarray, cfg: dict, target: float, max_clicks: int,
                   seed: int, trusted: frozenset[int] = frozenset(), appearance=None) -> tuple[np.ndarray, dict]:
    """Click every organ of ``start`` (one at a time, as an annotator does) until Dice >= ``target`` or
    ``max_clicks``; returns (the corrected label, per-organ clicks and Dice). ``trusted``: the organs whose
    pseudo label passed the quality gate (the app holds them more firmly, with ``appearance``: the organ looks
    learned from the labelled volumes, as the server learns them from its final labels)."""
    from ssl_medsam2 import interactive
    from ssl_medsam2.interactive.compose import organ_mask, put_organ
    from ssl_medsam2.interactive.requests import Edit
    from ssl_medsam2.interactive.simulate import click_session

    prepared = interactive.prepare(vol.array, vol.spacing)
    label = start.astype(np.int16).copy()
    out = {}
    for cid in ORGANS:
        base = label.copy()

        def predict(fg, bg, base=base, cid=cid):
            edit = Edit(cid, np.asarray(fg, np.int64).reshape(-1, 3), np.asarray(bg, np.int64).reshape(-1, 3))
            return organ_mask(prepared, base, edit, settings=cfg, trusted=trusted, appearance=appearance)

        s = click_session(predict, base == cid, truth == cid, max_clicks, seed=seed, stop_at=target)
        if s.clicks:
            label = put_organ(label, cid, s.prediction)
        out[str(cid)] = {"clicks": len(s.clicks), "dice_start": round(s.dice[0], 4), "dice_end": round(s.dice[-1], 4)}
    return label, out


def pseudo_label(query: str, supports: dict[str, Path], cfg: dict, work: Path) -> Path:
    """The folder with the atlas pseudo label of ``query`` from ``supports`` (name -> label file) and its
    summary."""
    from ssl_medsam2.pseudo_label import pseudo_label_folder

    images, labels, out = work / "images", work / "labels", work / "out"
    for d in (images, labels):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for name in (*supports, query):
        os.symlink(CHAOS / "imagesTr" / f"{name}_0000.nii.gz", images / f"{name}_0000.nii.gz")
    for name, path in supports.items():
        os.symlink(Path(path).resolve(), labels / f"{name}.nii.gz")
    shutil.rmtree(out, ignore_errors=True)
    c = json.loads(json.dumps(cfg))
    c["protocol"]["engine"] = "atlas"
    pseudo_label_folder(images, labels, out, c, show_progress=False, names=[query])
    return out


def campaign(strategy: str, pool: list[str], cfg: dict, cached: Path, work: Path, args) -> list[dict]:
    from ssl_medsam2.io import load_label_for, load_volume, save_like

    supports = {s: CHAOS / "labelsTr" / f"{s}.nii.gz" for s in SUPPORTS}
    remaining = list(pool)
    if strategy == "uncertainty":
        ent = {q: json.loads((cached / "summaries" / f"{q}.json").read_text())["mean_entropy_inside"] for q in pool}
        order = sorted(pool, key=lambda q: -ent[q])
    else:
        order = list(np.random.default_rng(args.seed).permutation(pool))
    steps = []
    for step, query in enumerate(order):
        remaining.remove(query)
        t0 = time.time()
        start = (cached if set(supports) == set(SUPPORTS) else pseudo_label(query, supports, cfg, work / "atlas"))
        t1 = time.time()
        vol = load_volume(CHAOS / "imagesTr" / f"{query}_0000.nii.gz", name=query)
        truth = load_label_for(vol, CHAOS / "labelsTr" / f"{query}.nii.gz").array
        base = load_label_for(vol, start / "labels" / f"{query}.nii.gz").array
        passed = passed_classes(start, query)
        t2 = time.time()
        looks = support_appearance(cfg, list(supports), supports)
        t3 = time.time()
        label, organs = correct_volume(vol, truth, base, cfg, args.target, args.max_clicks, args.seed, passed, looks)
        final = work / "final" / strategy / f"{query}.nii.gz"
        final.parent.mkdir(parents=True, exist_ok=True)
        save_like(label.astype(np.uint8), vol, final)
        supports[query] = final
        clicks = sum(o["clicks"] for o in organs.values())
        steps.append({"step": step + 1, "volume": query, "supports": len(supports) - 1, "clicks": clicks,
                      "organs": organs, "passed_gate": sorted(passed), "atlas_s": round(t1 - t0, 1), "appearance_s": round(t3 - t2, 1),
                      "clicks_s": round(time.time() - t3, 1)})
        print(f"{strategy:11s} step {step + 1} {query}: {clicks} clicks "
              + " ".join(f"{k}:{o['dice_start']:.3f}->{o['dice_end']:.3f}/{o['clicks']}" for k, o in organs.items()),
              flush=True)
    return steps


def empty_baseline(pool: list[str], cfg: dict, args) -> list[dict]:
    from ssl_medsam2.io import load_label_for, load_volume

    rows = []
    for query in pool:
        vol = load_volume(CHAOS / "imagesTr" / f"{query}_0000.nii.gz", name=query)
        truth = load_label_for(vol, CHAOS / "labelsTr" / f"{query}.nii.gz").array
        _, organs = correct_volume(vol, truth, np.zeros(truth.shape, np.int16), cfg, args.target, args.max_clicks,
                                   args.seed)
        clicks = sum(o["clicks"] for o in organs.values())
        rows.append({"volume": query, "clicks": clicks, "organs": organs})
        print(f"empty       {query}: {clicks} clicks "
              + " ".join(f"{k}:{o['dice_end']:.3f}/{o['clicks']}" for k, o in organs.items()), flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    empty = {r["volume"]: r["clicks"] for r in result["empty"]}
    for strategy, steps in result["campaigns"].items():
        ax.plot([0] + [s["step"] for s in steps], np.cumsum([0] + [s["clicks"] for s in steps]), marker="o",
                label=f"{strategy} (pseudo labels)")
        ax.plot([0] + [s["step"] for s in steps], np.cumsum([0] + [empty[s["volume"]] for s in steps]),
                linestyle=":", color="grey", label="empty label" if strategy == "uncertainty" else None)
    ax.set_xticks(range(len(next(iter(result["campaigns"].values()), [])) + 1))
    ax.set_xlabel("volumes annotated")
    ax.set_ylabel("clicks so far")
    ax.set_title(f"Clicks until every organ >= {result['target']} Dice (max {result['max_clicks']} per organ)",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    from ssl_medsam2.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", nargs="*", default=None, help="volumes to annotate (default: the 6 unlabelled)")
    ap.add_argument("--strategies", nargs="*", default=["uncertainty", "random"])
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--max-clicks", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. interactive.engine=geodesic")
    ap.add_argument("--out", default=str(REPO / "docs" / "figures" / "annotation_cost"))
    args = ap.parse_args(argv)

    cfg = load_config(overrides=args.set)
    cached = pseudo_label_dir(cfg)
    pool = args.pool or [c for c in chaos_cases() if c not in SUPPORTS]
    work = Path(tempfile.mkdtemp(prefix="bench-annotation-cost-"))
    try:
        campaigns = {s: campaign(s, pool, cfg, cached, work, args) for s in args.strategies}
        empty = empty_baseline(pool, cfg, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total_empty = sum(r["clicks"] for r in empty)
    result = {
        "engine": cfg["interactive"]["engine"], "pool": pool, "target": args.target, "max_clicks": args.max_clicks,
        "campaigns": campaigns, "empty": empty,
        "totals": {s: sum(x["clicks"] for x in steps) for s, steps in campaigns.items()} | {"empty": total_empty},
        "share_of_empty": {s: round(sum(x["clicks"] for x in steps) / max(total_empty, 1), 4)
                           for s, steps in campaigns.items()},
        "machine": "2-core CPU", "overrides": args.set,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("campaigns", "empty")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
