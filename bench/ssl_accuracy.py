"""Does FSL-nnUNet (2 labels + pseudo labels) approach nnU-Net trained on every label? Held-out liver Dice.

Real CHAOS T2-SPIR MRI from ../shared/data/chaos_t2spir, downsampled in-plane (default x4: 64x64,
5 mm) so that three nnU-Net trainings fit a 2-core CPU. Cases are split into a training pool and
held-out cases whose labels no pipeline ever sees (they are not even in the images folder):

- supervised_only:  nnU-Net on the 2 labelled pool cases alone (max_rounds=1, no unlabelled images)
- ssl_final:        the whole SSL-MedSAM2 pipeline (`run_ssl`): round 0 pseudo labels for the other
                    pool cases from the few-shot engine (atlas registration by default: SAM2 needs
                    weights this machine does not have), then nnU-Net rounds until convergence
- fully_supervised: nnU-Net on every pool case with its real label

All three use the same nnU-Net configuration and schedule. Held-out Dice is computed on the
canonical grid against the ground truth; the liver (class 1) is the headline, the mean over the
four organs is printed too. If the atlas engine cannot be built, round 0 falls back to
self-training (the supervised-only model's predictions) and the output says so.

The LAST line printed is one JSON object: supervised_only, ssl_final, fully_supervised, rounds,
minutes (plus round0_engine, schedule and per-organ figures).

    python bench/ssl_accuracy.py --threads 1         # default schedule: measured 31 min on 2 shared CPU cores
    python bench/ssl_accuracy.py --epochs 1 --iterations 3 --max-rounds 1 --factor 8   # ~12 min, plumbing only

Measured (2026-11, 2 shared CPU cores, default schedule 2d, 10 epochs x 20 iterations, 64x64 in-plane,
--threads 1): supervised_only 0.2344, ssl_final 0.2731, fully_supervised 0.2557 (held-out liver Dice),
2 rounds, 30.9 min. Every nnU-Net here is badly under-trained (200 iterations): the atlas round-0
pseudo labels (liver Dice 0.775 on the unlabelled pool) beat all of them, and the rounds lowered
pseudo-label quality (0.36, 0.43). With --epochs 25 --max-rounds 1 (500 iterations, 33.7 min):
supervised_only 0.2938, ssl_final 0.4019, fully_supervised 0.3959 (ratio 1.02; mean over 4 organs
0.16 / 0.43 / 0.51). The ratios meet the 0.95 goal only formally: these are not converged-accuracy
figures (fully supervised liver Dice 0.26-0.40); use a GPU and nnU-Net-length schedules for that.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from held_out import organ_dice  # noqa: E402
from shared_data import CHAOS, chaos_cases, downsample_case, work_folder  # noqa: E402

from ssl_medsam2.config import load_config  # noqa: E402
from ssl_medsam2.io import load_label_for, load_volume  # noqa: E402
from ssl_medsam2.metrics import dice  # noqa: E402

def held_out_dice(model_dir: Path, data: Path, held_out: list[str], device: str) -> dict:
    """Per-organ Dice of a model on the held-out cases (mean over cases)."""
    return organ_dice(model_dir, data / "heldout_images", data / "truth", held_out, device)


def prepare(root: Path, factor: int, n_labelled: int, n_heldout: int) -> dict:
    cases = chaos_cases()
    if len(cases) < n_labelled + n_heldout + 1:
        raise SystemExit(f"need at least {n_labelled + n_heldout + 1} CHAOS cases, found {len(cases)}")
    held_out = cases[-n_heldout:]
    pool = cases[:-n_heldout]
    labelled = pool[:n_labelled]
    for c in cases:
        dst = root / ("heldout_images" if c in held_out else "images")
        downsample_case(CHAOS / "imagesTr" / f"{c}_0000.nii.gz", CHAOS / "labelsTr" / f"{c}.nii.gz",
                        dst / f"{c}_0000.nii.gz", root / "truth" / f"{c}.nii.gz", factor=factor)
    for sub, names in (("labels_few", labelled), ("labels_all", pool)):
        (root / sub).mkdir()
        for c in names:
            shutil.copyfile(root / "truth" / f"{c}.nii.gz", root / sub / f"{c}.nii.gz")
    (root / "images_few").mkdir()
    for c in labelled:
        shutil.copyfile(root / "images" / f"{c}_0000.nii.gz", root / "images_few" / f"{c}_0000.nii.gz")
    return {"held_out": held_out, "pool": pool, "labelled": labelled}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=int, default=4, help="in-plane downsampling of the 256x256 slices")
    ap.add_argument("--labelled", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=2)
    ap.add_argument("--configuration", default="2d")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--max-rounds", type=int, default=2)
    ap.add_argument("--min-change", type=float, default=0.02)
    ap.add_argument("--gate", default="off", choices=["off", "holdout"],
                    help="nnunet.quality_gate of the SSL arm (off: every round deployed, as these figures were "
                         "measured; holdout keeps the 2nd labelled case out of training to judge rounds)")
    ap.add_argument("--engine", default="atlas", help="few-shot engine for round 0 (atlas | sam2 | ensemble)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--work", default=None, help="keep everything here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    log = logging.getLogger("bench.ssl_accuracy")
    t0 = time.perf_counter()
    with work_folder(args.work, "ssl_accuracy_", fresh=True) as root:
        split = prepare(root, args.factor, args.labelled, args.heldout)
        overrides = [f"nnunet.configuration={args.configuration}", f"nnunet.epochs={args.epochs}",
                     f"nnunet.iterations_per_epoch={args.iterations}", "nnunet.val_iterations=5",
                     f"nnunet.device={args.device}", f"nnunet.max_rounds={args.max_rounds}",
                     f"nnunet.min_change={args.min_change}", "nnunet.num_workers=1", "nnunet.num_processes=2",
                     "nnunet.quality_gate=off"]  # the supervised arms have nothing to gate
        if args.threads:
            overrides.append(f"nnunet.cpu_threads={args.threads}")
        cfg = load_config(overrides=overrides + [f"nnunet.quality_gate={args.gate}"])
        from ssl_medsam2.nnunet.layout import RunLayout
        from ssl_medsam2.nnunet.rounds import run_ssl
        from ssl_medsam2.devices import resolve_device

        device = str(resolve_device(args.device))
        times = {}
        log.info("split: labelled %s, unlabelled %s, held out %s", split["labelled"],
                 [c for c in split["pool"] if c not in split["labelled"]], split["held_out"])

        def supervised(name: str, images: str, labels: str, work: str) -> tuple[dict, dict]:
            """nnU-Net on real labels only (one round, no pseudo labels): its state and held-out Dice."""
            t = time.perf_counter()
            state = run_ssl(root / images, root / labels, root / work,
                            load_config(overrides=overrides + ["nnunet.max_rounds=1"]), show_progress=False)
            times[f"{name}_min"] = (time.perf_counter() - t) / 60
            scores = held_out_dice(Path(state["final"]["model_dir"]), root, split["held_out"], device)
            log.info("%s: held-out %s", name.replace("_", " "), scores)
            return state, scores

        # 1. supervised only: the 2 labelled volumes, nothing else
        sup, sup_dice = supervised("supervised_only", "images_few", "labels_few", "work_supervised")

        # 2. SSL: few-shot round 0 + nnU-Net rounds on the same 2 labels plus the unlabelled pool
        t = time.perf_counter()
        engine, round0 = None, args.engine
        try:
            from ssl_medsam2.engines import build_engine

            engine = build_engine(args.engine, cfg)
        except Exception as exc:  # noqa: BLE001 - any failure means: use the documented fallback
            log.warning("engine '%s' unavailable (%s: %s): round 0 = self-training with the supervised-only "
                        "model", args.engine, type(exc).__name__, exc)
        pseudo_dir = None
        if engine is None:
            from ssl_medsam2.nnunet.predict import predict_folder

            round0 = "self-training (supervised-only nnU-Net predictions)"
            unl = [c for c in split["pool"] if c not in split["labelled"]]
            predict_folder(sup["final"]["model_dir"], root / "images", root / "selftrain" / "labels",
                           device=device, names=unl)
            pseudo_dir = root / "selftrain"
        ssl = run_ssl(root / "images", root / "labels_few", root / "work_ssl", cfg, pseudo_labels_dir=pseudo_dir,
                      engine=engine, show_progress=False)
        times["ssl_min"] = (time.perf_counter() - t) / 60
        if ssl["final"]["model_dir"] is None:
            raise SystemExit(f"the SSL arm's quality gate kept round 0 (no nnU-Net model): {ssl['final']['warning']}")
        ssl_dice = held_out_dice(Path(ssl["final"]["model_dir"]), root, split["held_out"], device)
        log.info("SSL (%d rounds, %s): held-out %s", len(ssl["rounds"]), ssl["stop_reason"], ssl_dice)

        # round-0 pseudo-label quality on the unlabelled pool (these labels are never shown to training)
        pl_quality = {}
        for c in [c for c in split["pool"] if c not in split["labelled"]]:
            img = load_volume(root / "images" / f"{c}_0000.nii.gz", name=c)
            truth = load_label_for(img, root / "truth" / f"{c}.nii.gz").array
            for k in range(0, len(ssl["rounds"]) + 1):
                lab = load_label_for(img, RunLayout(root / "work_ssl").labels(k) / f"{c}.nii.gz").array
                pl_quality.setdefault(k, []).append(dice(lab == 1, truth == 1))
        pl_quality = {f"round_{k}": float(np.mean(v)) for k, v in pl_quality.items()}
        log.info("pseudo-label liver Dice on the unlabelled pool by round: %s", pl_quality)

        # 3. fully supervised: every pool volume with its real label
        _, full_dice = supervised("fully_supervised", "images", "labels_all", "work_full")

        minutes = (time.perf_counter() - t0) / 60
        result = {
            "supervised_only": round(sup_dice["liver"], 4),
            "ssl_final": round(ssl_dice["liver"], 4),
            "fully_supervised": round(full_dice["liver"], 4),
            "rounds": len(ssl["rounds"]),
            "minutes": round(minutes, 1),
            "ssl_over_full": round(ssl_dice["liver"] / full_dice["liver"], 4) if full_dice["liver"] else None,
            "round0_engine": round0,
            "stop_reason": ssl["stop_reason"],
            "round_changes": [round(r["change"], 4) for r in ssl["rounds"]],
            "pseudo_label_liver_dice_by_round": {k: round(v, 4) for k, v in pl_quality.items()},
            "mean_organs": {"supervised_only": round(sup_dice["mean_organs"], 4),
                            "ssl_final": round(ssl_dice["mean_organs"], 4),
                            "fully_supervised": round(full_dice["mean_organs"], 4)},
            "schedule": {"configuration": args.configuration, "epochs": args.epochs,
                         "iterations_per_epoch": args.iterations, "max_rounds": args.max_rounds,
                         "min_change": args.min_change, "in_plane_factor": args.factor, "device": device},
            "split": {"labelled": split["labelled"], "held_out": split["held_out"], "pool": split["pool"]},
            "stage_minutes": {k: round(v, 1) for k, v in times.items()},
        }
        print(f"held-out liver Dice: supervised-only {result['supervised_only']:.4f}, "
              f"SSL final {result['ssl_final']:.4f} ({result['rounds']} rounds, round 0: {round0}), "
              f"fully supervised {result['fully_supervised']:.4f}; ratio SSL/full {result['ssl_over_full']}")
        print(json.dumps(result))
        return result


if __name__ == "__main__":
    main()
