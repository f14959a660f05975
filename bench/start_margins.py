"""How far the in-plane start scores of the atlas engine separate a right start from a wrong one.

Why: the engine keeps the header's orientation (``rot0``) unless another start beats it by
``atlas.init_margin`` and every support prefers that start, and it flags the case when the header's
start wins by less than ``atlas.init_doubt_margin``. Both numbers must come from a distribution, not
one case. This bench scores every start for every ordered (query, support) pair of the shared CHAOS
volumes (at 2.5 mm in-plane, the working grid) for queries as stored and changed as scans arrive:

- ``as_stored``: the right start is the header's (``rot0``): its lead over the best other start is the
  margin a correctly stored scan has;
- ``rot90`` / ``flipped``: the array moved in-plane, the header kept: the right start
  is the one that undoes it; its lead over ``rot0`` is what a wrong header gives;
- ``longer_fov``: the support cropped in z to its organs (1 slice either side), the query full:
  the right start is ``rot0``.

    python bench/start_margins.py [--cases chaos_01 chaos_02 ...] [--queries chaos_01 ...] [--work DIR]
                                  [--variants as_stored flipped ...] [--replay LINES_OF_AN_EARLIER_RUN]

``--cases``: the volumes (default: every shared CHAOS volume); ``--queries``: the ones used as queries
(default: all of them), each with every other volume of ``--cases`` as a support.

Prints one line per pair and variant, then the summary; the LAST line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from shared_data import CHAOS, chaos_cases, downsample_case, organ_slab, work_folder

#: array change of the query (canonical order) -> the start that undoes it (found by this bench: the
#: start every pair ranks first; the test of the engine checks the same names)
VARIANTS = {"as_stored": (lambda a: a, "rot0"), "rot90": (lambda a: np.rot90(a, 1, (0, 1)), "rot270"),
            "flipped": (lambda a: a[::-1], "flip+rot0")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=None)
    ap.add_argument("--queries", nargs="*", default=None, help="default: every case")
    ap.add_argument("--work", default=None)
    ap.add_argument("--variants", nargs="*", default=None, help="of: as_stored rot90 flipped longer_fov")
    ap.add_argument("--replay", default=None, help="summarise the per-pair lines of an earlier run (a file) instead")
    args = ap.parse_args(argv)
    import SimpleITK as sitk  # noqa: F401

    from ssl_medsam2 import registration as reg
    from ssl_medsam2.config import load_config
    from ssl_medsam2.engines.atlas_engine import AtlasEngine
    from ssl_medsam2.io import load_label_for, load_volume

    engine = AtlasEngine.from_config(load_config())
    s, intensity = engine.settings, engine.intensity
    names = args.cases or chaos_cases()
    rows = []
    if args.replay:  # the per-pair lines printed by an earlier run
        rows = [r for r in map(json.loads, Path(args.replay).read_text().splitlines()) if r.get("query")]
    with work_folder(args.work, "start_margins_") as root:
        vols, labs, cropped = {}, {}, {}
        for n in [] if args.replay else names:
            img, lab = root / f"{n}.nii.gz", root / f"{n}_label.nii.gz"
            if not img.exists():
                downsample_case(CHAOS / "imagesTr" / f"{n}_0000.nii.gz", CHAOS / "labelsTr" / f"{n}.nii.gz", img, lab,
                                factor=2)
            vols[n] = load_volume(img, name=n)
            labs[n] = load_label_for(vols[n], lab)
            z = organ_slab(np.asarray(nib.load(str(lab)).dataobj))
            ci, cl = root / f"{n}_zcrop.nii.gz", root / f"{n}_zcrop_label.nii.gz"
            if not ci.exists():
                downsample_case(CHAOS / "imagesTr" / f"{n}_0000.nii.gz", CHAOS / "labelsTr" / f"{n}.nii.gz", ci, cl,
                                factor=2, z_range=z)
            cv = load_volume(ci, name=n)
            cropped[n] = (cv, load_label_for(cv, cl))
        with reg.sitk_threads(s):
            for q in [] if args.replay else args.queries or names:
                for variant, (change, right) in list(VARIANTS.items()) + [("longer_fov", (lambda a: a, "rot0"))]:
                    if args.variants and variant not in args.variants:
                        continue
                    fixed = reg.prepare(vols[q].like(np.ascontiguousarray(change(vols[q].array))), s, intensity)
                    for sup in names:
                        if sup == q:
                            continue
                        sv, sl = cropped[sup] if variant == "longer_fov" else (vols[sup], labs[sup])
                        moving = reg.prepare(sv, s, intensity)
                        own = [int(c) for c in np.unique(sl.array) if c]
                        focus = reg.focus_mask(sl, own, moving, s.focus_margin_mm)
                        t0 = time.process_time()
                        cand = reg.start_scores(fixed, moving, s, focus, slabs=True)
                        sc, shifts = reg.best_shifts(cand)
                        centred = {c["start"]: c["score"] for c in cand if c["shift_mm"] == 0}
                        t1 = time.process_time()
                        edges_centred = reg.edge_scores(fixed, moving, s, focus)
                        edge_cpu_s = time.process_time() - t1  # what the engine spends per used support
                        moved = {n for n, v in shifts.items() if v}  # the starts whose best slab shift is not 0
                        edges = {**edges_centred, **(reg.edge_scores(fixed, moving, s, focus, shifts, moved) if moved
                                                     else {})}
                        edge_s = time.process_time() - t1
                        row = {"query": q, "support": sup, "variant": variant, "right": right,
                               "best": max(sc, key=lambda n: (sc[n], n == "rot0")), "scores": sc, "shifts": shifts,
                               "scores_centred": centred, "edges": edges, "edges_centred": edges_centred,
                               "cpu_s": round(time.process_time() - t0 - edge_s, 2),
                               "edge_cpu_s": round(edge_cpu_s, 2)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    summary = {"centred_only": summarise(rows, "scores_centred"), "with_slab_shifts": summarise(rows),
               "engine_two_supports": {f"{m}/{d}": engine_choices(rows, m, d) for m, d in MARGINS},
               "edge_check": {str(e): engine_choices(rows, s.init_margin, s.init_doubt_margin, e)
                              for e in EDGE_MARGINS},
               "edge_check_cpu_s_per_support": round(float(np.mean([r["edge_cpu_s"] for r in rows])), 2),
               "configured": {"init_margin": s.init_margin, "init_doubt_margin": s.init_doubt_margin,
                              "start_check_margin": s.start_check_margin}}
    print(json.dumps(summary))
    return summary


#: (init_margin, init_doubt_margin) pairs replayed by :func:`engine_choices`
MARGINS = ((0.0, 0.0), (0.03, 0.03), (0.05, 0.05), (0.1, 0.03), (0.15, 0.03), (0.2, 0.03), (0.1, 0.0), (0.15, 0.0), (0.2, 0.0))

#: ``atlas.start_check_margin`` values replayed (with the configured init margins); None = no edge check
EDGE_MARGINS = (None, 0.0, 0.005, 0.01, 0.012, 0.015, 0.02, 0.03)


def engine_choices(rows: list[dict], margin: float, doubt_margin: float, edge_margin: float | None = None) -> dict:
    """The engine's start choice replayed from the measured scores for every query with every pair of
    other volumes as its 2 supports, as ``AtlasEngine`` does it: ``choose_start`` on the centred scores,
    again on the slab-shifted ones when that start is in doubt or not the header's; then, unless
    ``edge_margin`` is None, the edge check (``check_start`` on the edge scores from the same shifts). Per
    variant: ``right`` (the right start, not in doubt), ``flagged`` (in doubt: the case is failed),
    ``silently_wrong`` (a wrong start, not in doubt: the outcome that must not happen), and of the flagged
    ones those only the edge check flagged: ``edges_caught`` (a wrong start) and ``edges_false_alarm``
    (the right start)."""
    from itertools import combinations

    from ssl_medsam2 import registration as reg

    out = {}
    for variant in sorted({r["variant"] for r in rows}):
        tally = {"cases": 0, "right": 0, "flagged": 0, "silently_wrong": 0, "edges_caught": 0, "edges_false_alarm": 0}
        by_query: dict[str, dict] = {}
        for r in rows:
            if r["variant"] == variant:
                by_query.setdefault(r["query"], {})[r["support"]] = r
        for q, sup in sorted(by_query.items()):
            for a, b in combinations(sorted(sup), 2):
                pair = (sup[a], sup[b])
                c = reg.choose_start([p["scores_centred"] for p in pair], margin, doubt_margin)
                edges = "edges_centred"
                if c.doubt or c.start != reg.HEADER_START:
                    c = reg.choose_start([p["scores"] for p in pair], margin, doubt_margin)
                    edges = "edges"
                edge_doubt = None
                if edge_margin is not None:
                    edge_doubt = reg.check_start(c.start, [p[edges] for p in pair], edge_margin)["doubt"]
                tally["cases"] += 1
                if edge_doubt and not c.doubt:
                    tally["edges_caught" if c.start != pair[0]["right"] else "edges_false_alarm"] += 1
                if c.doubt or edge_doubt:
                    tally["flagged"] += 1
                elif c.start == pair[0]["right"]:
                    tally["right"] += 1
                else:
                    tally["silently_wrong"] += 1
        out[variant] = tally
    return out


def summarise(rows: list[dict], key: str = "scores") -> dict:
    """Per variant: how often each pair ranks the right start first, and the right start's lead.

    lead = score(right start) - score(best other start): > 0 where the right start wins. ``key``:
    ``scores`` (each start at its best slab shift, what the engine uses) or ``scores_centred`` (the
    centres of mass aligned only, the engine before slab shifts)."""
    out = {}
    rows = [dict(r, scores=r[key], best=max(r[key], key=lambda n: (r[key][n], n == "rot0"))) for r in rows]
    for variant in sorted({r["variant"] for r in rows}):
        rs = [r for r in rows if r["variant"] == variant]
        right = rs[0]["right"]
        leads = [r["scores"][right] - max(v for k, v in r["scores"].items() if k != right) for r in rs]
        over_rot0 = [r["scores"][right] - r["scores"]["rot0"] for r in rs] if right != "rot0" else None
        out[variant] = {"right": right, "pairs": len(rs), "right_first": sum(r["best"] == right for r in rs),
                        "lead_min": round(min(leads), 4), "lead_p05": round(float(np.percentile(leads, 5)), 4),
                        "lead_median": round(float(np.median(leads)), 4),
                        "over_rot0_min": None if over_rot0 is None else round(min(over_rot0), 4),
                        "wrong_firsts": sorted({r["best"] for r in rs if r["best"] != right})}
    return out


if __name__ == "__main__":
    main()
