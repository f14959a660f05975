"""Active-learning learning curve: does picking the next volume by uncertainty or disagreement beat random?

Real CHAOS T2-SPIR MRI (../shared/data/chaos_t2spir), downsampled in-plane (default x4: 64x64,
~6 mm) so that the whole curve fits a 2-core CPU. The last ``--test`` cases by name are the test set:
never an image, a support, a candidate or a label of any run. The rest is the pool: the first
``--start`` cases start labelled, the others are candidates. Each cycle, for every strategy:

1. round 0: atlas few-shot pseudo labels for the pool's unlabelled cases (the labelled ones are the
   supports; entropy per voxel comes with them);
2. nnU-Net (``ssl-medsam2 run``: 1 round on labels + pseudo labels, quality gate off so every arm
   trains on exactly its labelled set) - the same schedule and seed for every training;
3. score the model on the test cases (Dice per organ, mean over cases);
4. the strategy picks the next candidate, its ground truth is "annotated" (revealed) and it joins the
   labelled set:  uncertainty = mean pseudo-label entropy in and around the organs (strategies.uncertainty_score),
   disagreement = 1 - Dice(few-shot pseudo label, nnU-Net prediction) (strategies.disagreement_score),
   random = a seeded shuffle.

The first point (the start set) is shared by every strategy; a labelled set reached by two strategies
is trained once (same inputs, same seed -> same model). Every training has the same schedule
(``--epochs`` x 25 iterations, or ``--minutes N``: sized ONCE by nnunet.schedule=minutes:N from the
speed the first training measured, then fixed), so the arms compare at equal iterations. Planned
minutes (the schedule's estimate from the measured speed) and actual training minutes are reported.

Writes ``<out>/al_curve.json`` (every point) and ``<out>/al_curve.png`` (test Dice vs number of
labelled volumes); the LAST line printed is a JSON summary.

    python bench/al_curve.py --quick                 # 32x32, 1 cycle, 4 x 25 iterations: a few minutes
    python bench/al_curve.py                         # 64x64, 2 cycles, 8 x 25 iterations: ~25 min idle
    python bench/al_curve.py --factor 1 --minutes 30 --cycles 4 --device cuda   # full resolution, GPU

``--no-training``: the few-shot curve instead (bench/al_fewshot.py): no nnU-Net, every strategy against
random over ``--seeds`` seeds, pseudo-label Dice of the still-unlabelled volumes; PNG + JSON in docs/figures/.

    python bench/al_curve.py --no-training           # 8 CHAOS volumes at 128x128: ~6 CPU-min of registrations (cached)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from held_out import organ_dice
from shared_data import CHAOS, chaos_cases, downsample_case, work_folder

from ssl_medsam2 import strategies
from ssl_medsam2.config import load_config
from ssl_medsam2.io import load_label_for, load_volume
from ssl_medsam2.protocol import ProtocolSettings

STRATEGIES = ("uncertainty", "disagreement", "random")
log = logging.getLogger("bench.al_curve")


def prepare(root: Path, factor: int, n_test: int) -> tuple[list[str], list[str]]:
    cases = chaos_cases()
    test, pool = cases[-n_test:], cases[:-n_test]
    for c in cases:
        dst = root / ("test_images" if c in test else "images")
        if factor > 1:
            downsample_case(CHAOS / "imagesTr" / f"{c}_0000.nii.gz", CHAOS / "labelsTr" / f"{c}.nii.gz",
                            dst / f"{c}_0000.nii.gz", root / "truth" / f"{c}.nii.gz", factor=factor)
        else:
            dst.mkdir(parents=True, exist_ok=True)
            (root / "truth").mkdir(exist_ok=True)
            shutil.copyfile(CHAOS / "imagesTr" / f"{c}_0000.nii.gz", dst / f"{c}_0000.nii.gz")
            shutil.copyfile(CHAOS / "labelsTr" / f"{c}.nii.gz", root / "truth" / f"{c}.nii.gz")
    return pool, test


def test_dice(model_dir: Path, root: Path, test: list[str], device: str) -> dict:
    scores = organ_dice(model_dir, root / "test_images", root / "truth", test, device)
    return {k: round(v, 4) for k, v in scores.items()}


def train_point(root: Path, labelled: list[str], pool: list[str], overrides: list[str], device: str,
                test: list[str]) -> dict:
    """Pseudo labels + one nnU-Net round for this labelled set; test Dice and the candidates' scores."""
    from ssl_medsam2.nnunet.layout import RunLayout
    from ssl_medsam2.nnunet.rounds import run_ssl

    key = "_".join(sorted(labelled))
    work = root / "runs" / key
    lab_dir = work / "labels_given"
    lab_dir.mkdir(parents=True, exist_ok=True)
    for c in labelled:
        if not (lab_dir / f"{c}.nii.gz").exists():
            shutil.copyfile(root / "truth" / f"{c}.nii.gz", lab_dir / f"{c}.nii.gz")
    cfg = load_config(overrides=overrides)
    t = time.perf_counter()
    state = run_ssl(root / "images", lab_dir, work / "run", cfg, show_progress=False)
    wall = time.perf_counter() - t
    layout = RunLayout(work / "run")
    metrics = json.loads(layout.metrics(1).read_text())
    classes = state["classes"]
    band = ProtocolSettings.from_config(cfg).boundary_band
    scores = {"uncertainty": {}, "disagreement": {}}
    for c in [c for c in pool if c not in labelled]:
        img = load_volume(root / "images" / f"{c}_0000.nii.gz", name=c)
        fewshot = load_label_for(img, layout.labels(0) / f"{c}.nii.gz").array
        raw = np.asarray(nib.load(str(layout.entropy(0) / f"{c}.nii.gz")).dataobj, dtype=np.float32)
        ent = img.in_canonical_order(np.moveaxis(raw, -1, 0) if raw.ndim == 4 else raw)  # (C, X, Y, Z)
        scores["uncertainty"][c] = strategies.uncertainty_score(ent, fewshot, classes, band)
        nn = load_label_for(img, layout.labels(1) / f"{c}.nii.gz").array
        scores["disagreement"][c] = strategies.disagreement_score(fewshot, nn, classes)
    return {"labelled": sorted(labelled), "test_dice": test_dice(layout.model(1), root, test, device),
            "scores": scores, "schedule": state["schedule"],
            "train_minutes": round(metrics["seconds"].get("train_s", 0.0) / 60, 2),
            "run_minutes": round(wall / 60, 2)}


def pick(strategy: str, candidates: list[str], point: dict, seed: int, cycle: int) -> str:
    if strategy == "random":
        return strategies.rank_random(candidates, seed=seed * 1000 + cycle)[0]
    ranked = (strategies.rank_uncertainty if strategy == "uncertainty" else strategies.rank_disagreement)(
        candidates, point["scores"][strategy])
    return ranked[0]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(rc=matplotlib.rcParamsDefault):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, title in ((axes[0], "mean_organs", "test Dice, mean of 4 organs"),
                               (axes[1], "liver", "test Dice, liver")):
            for s, pts in result["curves"].items():
                ax.plot([p["n_labelled"] for p in pts], [p["test_dice"][key] for p in pts], "o-", label=s)
                for p in pts[1:]:
                    ax.annotate(p["picked"],
                                (p["n_labelled"], p["test_dice"][key]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
            ax.set(xlabel="labelled volumes", ylabel="Dice", title=title, ylim=(0, 1))
            ax.set_xticks(sorted({p["n_labelled"] for pts in result["curves"].values() for p in pts}))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        c = result["conditions"]
        fig.suptitle(f"CHAOS T2-SPIR, in-plane /{c['factor']}, test {', '.join(c['test'])}, "
                     f"{c['epochs']}x{c['iterations_per_epoch']} it per training, seed {c['seed']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32x32 in-plane, 1 cycle, 4 epochs per training")
    ap.add_argument("--factor", type=int, default=None, help="in-plane downsampling (default 4; --quick 8)")
    ap.add_argument("--cycles", type=int, default=None, help="volumes annotated after the start (default 2; --quick 1)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of 25 iterations per training (default 8; --quick 4)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="instead of --epochs: training minutes per run, sized once from the first training's speed")
    ap.add_argument("--start", type=int, default=2, help="labelled volumes at the start")
    ap.add_argument("--test", type=int, default=2, help="test volumes (the last cases by name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    ap.add_argument("--out", default="bench/results/al_curve", help="folder for al_curve.json / al_curve.png")
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temp dir, removed)")
    ap.add_argument("--no-training", action="store_true",
                    help="the few-shot curve: no nnU-Net, pseudo-label Dice of the unlabelled volumes (al_fewshot.py)")
    ap.add_argument("--seeds", type=int, default=5, help="--no-training: seeds (random start pair each)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="--no-training: config overrides (e.g. atlas.preset=fine)")
    args = ap.parse_args(argv)
    if args.no_training:
        from al_fewshot import run

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        out = Path(args.out if args.out != ap.get_default("out") else "docs/figures")
        with work_folder(args.work, "al_fewshot_") as root:
            return run(args.seeds, args.factor or 2, root, out, args.overrides)
    factor = args.factor or (8 if args.quick else 4)
    cycles = args.cycles if args.cycles is not None else (1 if args.quick else 2)
    epochs = args.epochs or (4 if args.quick else 8)
    minutes = args.minutes
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from ssl_medsam2.devices import resolve_device

    device = str(resolve_device(args.device))
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with work_folder(args.work, "al_curve_") as root:
        pool, test = prepare(root, factor, args.test)
        start = pool[: args.start]
        if len(pool) - args.start < cycles:
            raise SystemExit(f"only {len(pool) - args.start} candidates for {cycles} cycles")
        base = ["protocol.engine=atlas", f"nnunet.device={args.device}", "nnunet.max_rounds=1",
                "nnunet.quality_gate=off", "nnunet.num_workers=1", "nnunet.num_processes=2",
                f"nnunet.seed={args.seed}", f"nnunet.cpu_threads={args.threads}", f"atlas.seed={args.seed}"]
        log.info("pool %s (start labelled %s), test %s; %d cycle(s), %s per training, /%d in-plane",
                 pool, start, test, cycles, f"{minutes:g} min" if minutes else f"{epochs} x 25 iterations", factor)
        # the first training measures the speed (and sizes minutes:N); every later one reuses its schedule
        points: dict[str, dict] = {}
        first_sched = ([f"nnunet.schedule=minutes:{minutes:g}"] if minutes else
                       ["nnunet.schedule=short", f"nnunet.epochs={epochs}", "nnunet.iterations_per_epoch=25",
                        "nnunet.val_iterations=5"])
        first = train_point(root, start, pool, base + first_sched, device, test)
        sched = first["schedule"]
        fixed = base + ["nnunet.schedule=short", f"nnunet.epochs={sched['epochs']}",
                        f"nnunet.iterations_per_epoch={sched['iterations_per_epoch']}",
                        f"nnunet.val_iterations={sched['val_iterations']}"]
        points["_".join(sorted(start))] = first
        log.info("schedule for every training: %s", sched)
        curves = {}
        for s in STRATEGIES:
            labelled = list(start)
            pts = [{"n_labelled": len(labelled), "labelled": list(labelled), "picked": None,
                    "test_dice": first["test_dice"]}]
            point = first
            for cycle in range(1, cycles + 1):
                candidates = [c for c in pool if c not in labelled]
                prev = point
                choice = pick(s, candidates, point, args.seed, cycle)
                labelled.append(choice)
                key = "_".join(sorted(labelled))
                if key not in points:
                    log.info("%s, cycle %d: annotate %s -> train on %s", s, cycle, choice, sorted(labelled))
                    points[key] = train_point(root, labelled, pool, fixed, device, test)
                point = points[key]
                pts.append({"n_labelled": len(labelled), "labelled": list(labelled), "picked": choice,
                            "scores_at_pick": None if s == "random" else prev["scores"][s],
                            "test_dice": point["test_dice"]})
                log.info("%s, %d labelled: test %s", s, len(labelled), point["test_dice"])
            curves[s] = pts
        trainings = list(points.values())
        result = {
            "curves": curves,
            "scores_by_labelled_set": {k: v["scores"] for k, v in points.items()},
            "conditions": {"factor": factor, "pool": pool, "start": start, "test": test, "cycles": cycles,
                           "seed": args.seed, "device": device, "threads": args.threads,
                           "epochs": sched["epochs"], "iterations_per_epoch": sched["iterations_per_epoch"],
                           "val_iterations": sched["val_iterations"], "configuration": "2d",
                           "round0": "atlas", "rounds": 1, "quality_gate": "off"},
            "minutes_planned_per_training": sched.get("estimated_minutes_per_round"),
            "minutes_actual_training": [p["train_minutes"] for p in trainings],
            "measured_it_per_s": sched.get("it_per_s"),
            "trainings": len(trainings),
            "minutes_total": round((time.perf_counter() - t0) / 60, 1),
        }
        (out / "al_curve.json").write_text(json.dumps(result, indent=2))
        plot(result, out / "al_curve.png")
        summary = {s: [(p["n_labelled"], p["picked"], p["test_dice"]["mean_organs"], p["test_dice"]["liver"])
                       for p in pts] for s, pts in curves.items()}
        print(json.dumps({"summary_n_picked_mean_liver": summary,
                          "minutes_planned_per_training": result["minutes_planned_per_training"],
                          "minutes_actual_training": result["minutes_actual_training"],
                          "minutes_total": result["minutes_total"], "out": str(out)}))
        return result


if __name__ == "__main__":
    main()
