"""A run's memory: ``state.json`` (what is finished and with which settings) and ``final.json`` (what is deployed).

Resuming is reading this back: settings that change what a finished round contains are compared
with the ones the work dir was made with, and a difference is refused (new settings -> new
``--work``); the image/label set must match too. The schedule is the exception: a person may give a
resumed run another one (:data:`SCHEDULE_KEYS`); finished rounds keep their models and the new schedule
applies from the round in progress, whose training starts over (the log says so). The resolved schedule
and the quality-gate decisions live here, so a resumed run deploys the same rounds.
"""

from __future__ import annotations

import json
import logging

from ..io import InputError, write_text_atomic
from .layout import RunLayout
from .settings import NnUNetSettings

log = logging.getLogger(__name__)
#: settings that change what a finished round contains; a work dir refuses to continue with others
FINGERPRINT_KEYS = ("configuration", "fold", "schedule", "epochs", "iterations_per_epoch", "val_iterations",
                    "fine_tune", "ignore_entropy_threshold", "gpu_memory_target", "quality_gate", "gate_cases")
#: the part of the fingerprint a resumed run may change: how long a round trains
SCHEDULE_KEYS = ("schedule", "epochs", "iterations_per_epoch", "val_iterations")


def settings(nnunet: NnUNetSettings, engine_name: str) -> dict:
    """The run's fingerprint: these settings as configured (state.json keeps them to refuse others)."""
    return {**{k: getattr(nnunet, k) for k in FINGERPRINT_KEYS}, "round0": engine_name}


def open_state(layout: RunLayout, settings_now: dict, labelled: list[str], unlabelled: list[str],
               classes: list[int], gate_cases: list[str], gate_why: str, inputs: dict) -> dict:
    """The work dir's state: checked against these settings and inputs, or a new one."""
    state = json.loads(layout.state_path.read_text()) if layout.state_path.exists() else None
    if state is None:
        return {"settings": settings_now, "labelled": sorted(labelled), "unlabelled": unlabelled, "classes": classes,
                "gate": {"cases": gate_cases, "why": gate_why}, "inputs": inputs,
                "round0": {"done": False, "source": settings_now["round0"]}, "rounds": [],
                "deployed": None, "schedule": None}
    old = state["settings"]
    diff = {k: (old.get(k), v) for k, v in settings_now.items()
            if k != "round0" and k not in SCHEDULE_KEYS and old.get(k) != v}
    if diff:
        raise InputError(layout.work, "this work dir was made with other settings "
                                      + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                                      + "; use a new --work folder (or the old settings)")
    if state["labelled"] != sorted(labelled) or state["unlabelled"] != unlabelled:
        raise InputError(layout.work, "this work dir was made with other images/labels; use a new --work folder")
    changed = {k: (old.get(k), settings_now[k]) for k in SCHEDULE_KEYS if old.get(k) != settings_now[k]}
    if changed:
        _change_schedule(layout, state, changed)
    return state


def _change_schedule(layout: RunLayout, state: dict, changed: dict) -> None:
    """A resumed run with another schedule: finished rounds stay, the round in progress trains anew with it."""
    what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    finished = len(layout.finished_rounds())
    k = finished + 1
    kept = f"round(s) 1-{finished} keep their models; " if finished else ""
    trained = any(layout.model(k).glob("fold_*/checkpoint_final.pth")) if layout.model(k).is_dir() else False
    if trained:
        starts = (f"round {k}'s model was already trained with the old schedule and is kept; the new schedule "
                  f"applies from round {k + 1}")
    elif layout.nnunet_root(k).exists():
        starts = (f"round {k}'s training starts over from epoch 0 with it (its checkpoint of the old schedule "
                  f"is not used; its export and preprocessing are kept)")
    else:
        starts = f"round {k} trains with it"
    state["settings"].update({key: b for key, (_, b) in changed.items()})
    state.setdefault("schedule_changes", []).append({"from_round": k + 1 if trained else k, "changed": what,
                                                     "previous": state.get("schedule")})
    state["schedule"] = None  # resolved again (and said) before the next training
    log.info("schedule changed on resume (%s): %s%s", what, kept, starts)


def save(layout: RunLayout, state: dict) -> None:
    layout.work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(state, indent=2), layout.state_path)


def round_summary(m: dict) -> dict:
    keys = ("round", "change", "labelled_dice", "gate_dice", "deployed", "gate_message", "model_dir")
    return {k: m.get(k) for k in keys}


def write_final(layout: RunLayout, state: dict) -> dict:
    """``final.json``: the deployed round, its model (None for round 0), schedule and gate verdicts."""
    dep = state["deployed"]
    k = int(dep["round"])
    rejected = [r for r in state["rounds"] if r.get("deployed") is False]
    final = {
        "round": k,
        "model_dir": str(layout.model(k)) if k > 0 else None,
        "pseudo_labels_dir": str(layout.labels(k)),
        "gate_dice": dep.get("gate_dice"),
        "quality_gate": state["gate"],
        "schedule": state.get("schedule"),
        "rounds_finished": len(state["rounds"]),
        "not_deployed": [{"round": r["round"], "gate_dice": r.get("gate_dice")} for r in rejected],
        "message": dep.get("message"),
        "warning": rejected[0].get("gate_message") if rejected else None,
    }
    if k == 0 and rejected:
        final["note"] = ("no nnU-Net round beat the few-shot round 0 on the held-out gate case: the deployed "
                         "'model' is the few-shot engine with the labelled cases as supports")
    elif k == 0:
        final["note"] = ("round 0 is deployed (no nnU-Net round has finished yet): the deployed 'model' is the "
                         "few-shot engine with the labelled cases as supports")
    write_text_atomic(json.dumps(final, indent=2), layout.final_path)
    state["final"] = final
    return final



def describe_kept(work) -> str:
    """What a stopped run keeps, in words (the line after Ctrl-C): finished rounds, and how far the round in
    progress got (preprocessing, the epoch of its checkpoint, predicted cases)."""
    layout = RunLayout(work)
    if not layout.state_path.exists():
        return "nothing yet (stopped before round 0 started)"
    state = json.loads(layout.state_path.read_text())
    n0 = len(list(layout.labels(0).glob("*.nii.gz"))) if layout.labels(0).is_dir() else 0
    parts = ["round 0 (few-shot pseudo labels)" if state["round0"]["done"]
             else f"round 0: {n0} pseudo label(s) of {len(state['unlabelled']) + len(state['gate']['cases'])}"]
    finished = layout.finished_rounds()
    if finished:
        parts.append(f"round(s) 1-{len(finished)}" if len(finished) > 1 else "round 1")
    k = len(finished) + 1
    if state["round0"]["done"] and layout.round(k).exists():
        parts.append(_round_in_progress(layout, k))
    deployed = (state.get("deployed") or {}).get("round")
    return ", ".join(p for p in parts if p) + ("" if deployed is None else f" (deployed: round {deployed})")


def _round_in_progress(layout: RunLayout, k: int) -> str:
    if layout.model(k).exists():
        n = len(list((layout.round(k) / "labels").glob("*.nii.gz"))) if (layout.round(k) / "labels").is_dir() else 0
        return f"round {k}'s trained model and {n} prediction(s)"
    latest = sorted(layout.nnunet_root(k).rglob("checkpoint_latest.pth")) if layout.nnunet_root(k).exists() else []
    if latest:
        try:
            import torch

            c = torch.load(str(latest[0]), map_location="cpu", weights_only=False)
            partial = c.get("ssl_partial_epoch") or {}
            its = len(partial.get("train_losses", []))
            return (f"round {k}'s training checkpoint (epoch {int(c['current_epoch']) + (1 if its else 0)}"
                    + (f", {its} iterations into it" if its else " done") + ")")
        except Exception:
            return f"round {k}'s training checkpoint"
    if (layout.nnunet_root(k) / "prepared.json").exists():
        return f"round {k}'s export + preprocessing"
    return ""
