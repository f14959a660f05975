"""Trainer ``ssl_nnunet``: FSL-nnUNet rounds on the datastore, one model version per run, promoted only
when it is at least as good on the labelled cases as the deployed one.

Runs in MONAI Label's training child process. Inputs are linked into the version folder (images,
final labels, and the datastore's pseudo labels as round 0 when every unlabelled image has one);
progress goes to ``<state>/train_stats.json`` (what ``/info`` -> ``train_stats`` and the OHIF panel
read: epoch, total_epochs, best_metric, total_time, plus the CLI progress line's fields: round,
max_rounds, it_per_s, eta_s, eta_run_s, train_loss, pseudo_dice) and to stdout (``GET /train/`` details).

Two gates: inside a run, the library's quality gate (a round must not be worse than the round it
replaces on a held-out labelled case; ``quality_gate`` in train_stats, with its warning); across
versions, :func:`should_promote`. A run whose gate kept round 0 produced no better model: its version
is recorded, not promoted, and ``/info`` says why (``not_promoted_because``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.train import TrainTask

from ssl_medsam2.io import link_or_copy, load_label_for, load_volume, write_text_atomic
from ssl_medsam2.metrics import mean_dice
from ssl_medsam2.nnunet.layout import RunLayout
from ssl_medsam2.nnunet.reporting import RunProgress, Ticker
from ssl_medsam2.nnunet.settings import NnUNetSettings

from .workspace import Workspace

log = logging.getLogger(__name__)


def _nifti_name(image_id: str, path: str) -> str:
    return image_id + (".nii.gz" if path.endswith(".nii.gz") else Path(path).suffix)


def should_promote(new_dice: float | None, deployed_dice: float | None, tolerance: float) -> bool:
    """Deploy the new version unless it is worse on the labelled cases than the deployed one.

    Both Dice values are measured on the same labelled cases at promotion time (the labelled set
    grows between versions, so a stored old score would not be comparable). No deployed version or
    no score for it: promote; no score for the new one: keep the deployed one.
    """
    if deployed_dice is None:
        return True
    if new_dice is None:
        return False
    return new_dice >= deployed_dice - tolerance


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(pid, started) -> bool:
    """The process that wrote a RUNNING status is still running (not gone, not a zombie, not a reused pid).
    Without a pid (a status written before pids were recorded) it is taken as alive."""
    import psutil

    if not pid:
        return True
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except psutil.Error:
        return False


class SSLNnUNetTrain(TrainTask):
    def __init__(self, ws: Workspace):
        super().__init__("FSL-nnUNet: nnU-Net rounds on final labels + refined pseudo labels (SSL-MedSAM2)")
        self.ws = ws

    def config(self):
        n = NnUNetSettings.from_config(self.ws.cfg)
        keys = ("configuration", "schedule", "epochs", "iterations_per_epoch", "max_rounds", "device", "quality_gate")
        return {k: getattr(n, k) for k in keys}

    def stats(self):
        p = self.ws.train_stats_path
        stats = {}
        if p.exists():
            try:
                stats = json.loads(p.read_text())
            except json.JSONDecodeError:
                stats = {}
        if stats.get("status") == "RUNNING" and not _alive(stats.get("pid"), stats.get("pid_started")):
            stats = self._mark_stopped(stats)
        cur = self.ws.registry.current()
        stats["current_version"] = cur["id"] if cur else None
        stats["current_dice"] = cur.get("dice") if cur else None
        stats["current_quality_gate"] = cur.get("quality_gate") if cur else None
        return stats

    def _mark_stopped(self, stats: dict) -> dict:
        """A run whose process is gone without writing its end (``DELETE /train/`` kills it; so can the OOM
        killer): say so, and remove its version folder unless the registry lists it."""
        version = stats.get("version")
        removed = False
        if version and version not in {v["id"] for v in self.ws.registry.state().get("versions", [])}:
            folder = self.ws.registry.root / str(version)
            if folder.is_dir() and folder.parent == self.ws.registry.root:
                shutil.rmtree(folder, ignore_errors=True)
                removed = True
        stats = {**stats, "status": "STOPPED", "stage": "stopped", "stopped_at": time.time(),
                 "reason": f"the training process (pid {stats.get('pid')}) ended without finishing: stopped "
                           f"(DELETE /train/) or killed; no model version was kept"
                           + (f" (its folder {version} was removed)" if removed else "")}
        self._write_stats(stats)
        log.warning("ssl_nnunet %s: %s", version, stats["reason"])
        return stats

    # -- helpers --
    def _write_stats(self, stats: dict) -> None:
        write_text_atomic(json.dumps(stats, indent=2, default=str), self.ws.train_stats_path)

    def _inputs(self, work: Path, datastore) -> tuple[Path, Path, Path | None, dict]:
        images, labels, pseudo = work / "inputs" / "images", work / "inputs" / "labels", work / "inputs" / "pseudo"
        final = self.ws.final_labelled()
        if not final:
            raise ValueError("no final label in the datastore: save at least one label before training")
        for i in self.ws.image_ids():
            img = datastore.get_image_uri(i)
            link_or_copy(img, images / _nifti_name(i, img))
        for i, (_, lab) in final.items():
            link_or_copy(lab, labels / _nifti_name(i, lab))
        unlabelled = [i for i in self.ws.image_ids() if i not in final]
        have = {i: datastore.get_label_uri(i, self.ws.pseudo_tag) for i in unlabelled}
        have = {i: p for i, p in have.items() if p and os.path.exists(p)}
        use_pseudo = bool(unlabelled) and len(have) == len(unlabelled)
        if use_pseudo:
            for i, p in have.items():
                link_or_copy(p, pseudo / _nifti_name(i, p))
        return images, labels, pseudo if use_pseudo else None, final

    def _label_origins(self, final: dict, datastore) -> dict[str, list[str]]:
        """The stored pseudo labels a final label may have been saved from (the pseudo tag's label and the
        few-shot infer output of that image): a final label identical to one of them never gates."""
        from ssl_medsam2.io import case_name

        out: dict[str, list[str]] = {}
        for i, (img, _) in final.items():
            cands = [datastore.get_label_uri(i, self.ws.pseudo_tag),
                     str(self.ws.fewshot_dir / "labels" / f"{i}.nii.gz")]
            paths = [p for p in cands if p and os.path.exists(p)]
            if paths:
                out[case_name(_nifti_name(i, img))] = paths
        return out

    def _dice_on_labelled(self, model_dir: str, final: dict) -> float | None:
        from ssl_medsam2.nnunet.predict import NnUNetModel

        n = self.ws.app.promote_eval_cases
        model = NnUNetModel(model_dir, device=self._device())
        vals = []
        for i in sorted(final)[:n]:
            img = load_volume(final[i][0], name=i)
            ref = load_label_for(img, final[i][1]).array
            pred, _ = model.predict_volume(img)
            d = mean_dice(ref, np.asarray(pred))
            if d is not None:
                vals.append(d)
        return float(np.mean(vals)) if vals else None

    def _device(self):
        return NnUNetSettings.from_config(self.ws.cfg).torch_device()

    def __call__(self, request, datastore):
        from ssl_medsam2.config import merge
        from ssl_medsam2.nnunet.rounds import TICK_S, run_ssl

        t0 = time.time()
        cfg = self.ws.cfg
        # request keys named like nnunet config keys override them for this run (e.g. {"epochs": 1})
        over = {k: request[k] for k in NnUNetSettings.keys() if k in request}
        if over:
            cfg = merge(cfg, {"nnunet": over})
        max_rounds = NnUNetSettings.from_config(cfg).max_rounds  # after the overrides: what this run does
        version = self.ws.registry.next_id()
        work = self.ws.registry.root / version
        images, labels, pseudo, final = self._inputs(work, datastore)
        # same fields as the CLI's progress line: round k/K, epoch e/E, it/s, ETA, train loss, pseudo Dice
        tracker = RunProgress()
        stats = {"status": "RUNNING", "version": version, "pid": os.getpid(), "pid_started": _started(os.getpid()),
                 **tracker.fields, "max_rounds": max_rounds,
                 "best_metric": None, "start_ts": t0, "total_time": "0s", "labelled": sorted(final)}
        self._write_stats(stats)

        lock = threading.Lock()

        def progress(event: dict):
            # a tick only lets time pass: total_time and the ETAs move between epochs (no stdout line for it)
            with lock:
                stats.update({k: v for k, v in event.items() if v is not None and k != "tick"})
                stats.update({k: v for k, v in tracker.update(event).items()
                              if v is not None or k.startswith("eta")})
                stats["total_time"] = f"{time.time() - t0:.0f}s"
                self._write_stats(stats)
            if not event.get("tick"):
                print("ssl_nnunet progress " + json.dumps(event, default=str), flush=True)

        try:
            rounds = RunLayout(work / "rounds")
            # the gate rotates over the person-made labels from one version to the next (none lost for good)
            with Ticker(progress, TICK_S):
                state = run_ssl(images, labels, rounds.work, cfg, pseudo_labels_dir=pseudo, progress=progress,
                                show_progress=False, label_origins=self._label_origins(final, datastore),
                                gate_turn=int(version.lstrip("v")) - 1)
            final_json = rounds.read_final()
            model_dir = rounds.deployed_model_dir()
            gate = {"deployed_round": final_json.get("round"), "gate_dice": final_json.get("gate_dice"),
                    "cases": final_json.get("quality_gate", {}).get("cases"),
                    "why": final_json.get("quality_gate", {}).get("why"), "warning": final_json.get("warning"),
                    "message": final_json.get("message")}
            stats["quality_gate"] = gate
            if final_json.get("warning"):
                print("!" * 100 + f"\nssl_nnunet {version}: {final_json['warning']}\n" + "!" * 100, flush=True)
            progress({"stage": "evaluate"})
            cur = self.ws.registry.current()
            new_dice = self._dice_on_labelled(str(model_dir), final) if model_dir else None
            cur_dice = self._dice_on_labelled(cur["model_dir"], final) if cur and model_dir else None
            tol = self.ws.app.promote_tolerance
            # no model: the run's quality gate kept round 0 (no nnU-Net round beat the few-shot labels)
            promote = model_dir is not None and should_promote(new_dice, cur_dice if cur else None, tol)
            entry = {"id": version, "model_dir": str(model_dir) if model_dir else None, "dice": new_dice,
                     "round": final_json.get("round"), "labelled": sorted(final),
                     "compared_with": cur["id"] if cur else None, "compared_dice": cur_dice,
                     "quality_gate": gate, "schedule": final_json.get("schedule"),
                     "train_s": round(time.time() - t0, 1)}
            self.ws.registry.add(entry, promote)
            self._keep_fewshot_outputs(rounds)
            if promote:
                self._publish_pseudo_labels(rounds, final, datastore)
            stats.update({"status": "DONE", "stage": "done", "promoted": promote, "dice_labelled": new_dice,
                          "previous_dice_labelled": cur_dice, "total_time": f"{time.time() - t0:.0f}s"})
            if model_dir is None:
                stats["not_promoted_because"] = final_json.get("warning") or final_json.get("note")
            self._write_stats(stats)
            print(f"ssl_nnunet {version}: Dice on labelled {new_dice} vs deployed {cur_dice} -> "
                  f"{'PROMOTED' if promote else 'kept previous'}", flush=True)
            return {"version": version, "promoted": promote, "dice": new_dice, "previous_dice": cur_dice,
                    "state": state if isinstance(state, dict) else None}
        except BaseException as exc:
            stats.update({"status": "ERROR", "error": f"{type(exc).__name__}: {exc}",
                          "total_time": f"{time.time() - t0:.0f}s"})
            self._write_stats(stats)
            raise

    def _keep_fewshot_outputs(self, rounds: RunLayout) -> None:
        """Round 0's few-shot outputs (when this run made them) feed the uncertainty/disagreement scores.

        Only cases with no stored few-shot output yet are copied: an explicit few-shot infer is newer.
        """
        from ssl_medsam2.io import case_name
        from ssl_medsam2.pseudo_label import OUTPUT_KINDS

        r0 = rounds.round(0)
        ids = {case_name(i): i for i in self.ws.image_ids()}
        for summ in sorted((r0 / "summaries").glob("*.json")) if (r0 / "summaries").is_dir() else []:
            i = ids.get(summ.stem)
            if i is None:
                continue
            src = {k: r0 / k / (f"{summ.stem}.json" if k == "summaries" else f"{summ.stem}.nii.gz") for k in OUTPUT_KINDS}
            dst = {k: self.ws.fewshot_dir / k / (f"{i}.json" if k == "summaries" else f"{i}.nii.gz") for k in OUTPUT_KINDS}
            if all(p.exists() for p in src.values()) and not any(p.exists() for p in dst.values()):
                for k in OUTPUT_KINDS:
                    dst[k].parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src[k], dst[k])

    def _publish_pseudo_labels(self, rounds: RunLayout, final: dict, datastore) -> None:
        """Refined pseudo labels of the deployed round go to the datastore under the pseudo tag."""
        round_no = rounds.deployed_round()
        folder = rounds.deployed_labels_dir()
        if folder is None or not folder.is_dir():
            return
        from ssl_medsam2.io import case_name

        ids = {case_name(i): i for i in self.ws.image_ids()}
        for p in sorted(folder.glob("*.nii*")):
            i = ids.get(case_name(p))
            if i and i not in final:
                datastore.save_label(i, str(p), self.ws.pseudo_tag, {"source": "ssl_nnunet", "round": round_no})
