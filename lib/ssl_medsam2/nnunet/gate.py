"""The quality gate: a round is deployed only if it is not worse than what it replaces.

Why a held-out labelled case: every image of a run is in nnU-Net's training set (ground truth or a
pseudo label), so Dice on the labelled cases measures fit, not quality — a short schedule once shipped
a round whose labelled Dice was 0.04 over an atlas round 0 at 0.75. The gate therefore keeps
``nnunet.gate_cases`` labelled case(s) out of nnU-Net's ground truth (``nnunet.quality_gate:
holdout``). Such a gate case is treated like an unlabelled one: round 0 gives it a leave-one-out
few-shot pseudo label (its supports are the *other* labelled cases), every round trains on its
previous-round pseudo label and predicts it. Its ground truth is used for one thing only: scoring.

- round 0's gate score = Dice of the gate case's few-shot pseudo label;
- round k's gate score = Dice of round k's nnU-Net prediction of the gate case;
- round k is deployed when its score >= the deployed round's score - ``nnunet.gate_tolerance``;
  otherwise the deployed round stays, the run says so (console, ``final.json``, ``state.json``,
  MONAI Label ``/info``) and stops refining: a worse model would only feed worse pseudo labels to the
  next round.

Which case gates (:func:`pick_gate_cases`): only a label a person made or edited. A label saved
unchanged from its pseudo label (:func:`unchanged_pseudo_labels`: voxel-identical to the stored pseudo
label of that case) would be judged against the engine's own output: its leave-one-out few-shot label
reproduces it and round 0 scores ~1.0, a score no nnU-Net round can beat, so the gate would lock itself.
Among the candidates the gate *rotates* with ``turn`` (the MONAI Label app passes its version number), so
from one training to the next every labelled case trains nnU-Net again and none is lost for good.

Costs, said plainly: the gate case's ground truth never trains nnU-Net in that run (with 2 labelled
cases, the model sees 1 ground truth + pseudo labels, the gate case's image with its leave-one-out pseudo
label), and one held-out case is a noisy judge. With more labelled cases raise ``nnunet.gate_cases``;
with a single labelled case (or no person-made one) there is nothing to hold out and the gate is off
(said in the log). ``quality_gate: off`` deploys every round (the old behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..io import load_label_for, load_volume
from ..metrics import mean_dice
from .settings import NnUNetSettings


def unchanged_pseudo_labels(images: Mapping[str, Path], labels: Mapping[str, Path],
                            origins: Mapping[str, Sequence[Path]]) -> dict[str, int]:
    """Labelled case -> voxels that differ from its stored pseudo label (the closest one when there are
    several), for the labelled cases that have one in ``origins``; 0 means saved unchanged."""
    out = {}
    for n in sorted(labels):
        paths = [Path(p) for p in origins.get(n, ()) if Path(p).exists()]
        if not paths:
            continue
        img = load_volume(images[n], name=n)
        truth = load_label_for(img, labels[n]).array
        out[n] = min(int(np.count_nonzero(load_label_for(img, p).array != truth)) for p in paths)
    return out


def pick_gate_cases(labelled: Sequence[str], settings: NnUNetSettings, edits: Mapping[str, int] | None = None,
                    turn: int = 0) -> tuple[list[str], str]:
    """(gate cases, why): ``gate_cases`` person-made labelled cases, rotating with ``turn``.

    ``edits``: :func:`unchanged_pseudo_labels` (a case with 0 is an unchanged pseudo label and never gates;
    a case without an entry has no stored pseudo label: made by a person).
    """
    if settings.gate_mode == "off":
        return [], "quality gate off (nnunet.quality_gate: off): every round is deployed"
    n = int(settings.gate_cases)
    labelled = sorted(labelled)
    edits = dict(edits or {})
    unchanged = [c for c in labelled if edits.get(c) == 0]
    candidates = [c for c in labelled if c not in unchanged]
    skipped = (f"; not {', '.join(unchanged)}: saved unchanged from the stored pseudo label (the few-shot engine "
               f"would be scored against its own output)") if unchanged else ""
    if n < 1 or len(labelled) - n < 1:
        return [], (f"quality gate off: holding out {n} of {len(labelled)} labelled case(s) would leave no "
                    f"ground truth to train on (label one more volume to turn it on)")
    if len(candidates) < n:
        return [], (f"quality gate off: {len(candidates)} of {len(labelled)} labelled case(s) were made or edited "
                    f"by a person, {n} needed (nnunet.gate_cases){skipped}")
    last_first = candidates[::-1]  # turn 0: the last by name, turn 1 the one before, ...
    gate = sorted(last_first[(int(turn) + i) % len(candidates)] for i in range(n))
    origin = ", ".join(f"{c}: " + ("no stored pseudo label" if c not in edits else f"{edits[c]} voxels edited "
                                   f"from its pseudo label") for c in gate)
    return gate, (f"quality gate on: labelled case(s) {', '.join(gate)} held out of nnU-Net's ground truth "
                  f"({origin}; turn {int(turn)} of the {len(candidates)} person-made case(s) "
                  f"{', '.join(candidates)}: the next training gates on another){skipped}; each round must "
                  f"score at least what it replaces on them")


def gate_score(pred_dir: Path, gate: Sequence[str], images: Mapping[str, Path], labels: Mapping[str, Path],
               classes: Sequence[int]) -> dict | None:
    """Mean Dice (over classes, then cases) of ``pred_dir/<case>.nii.gz`` against the gate cases' truth."""
    if not gate:
        return None
    per_case = {}
    for n in gate:
        img = load_volume(images[n], name=n)
        pred = load_label_for(img, Path(pred_dir) / f"{n}.nii.gz").array
        per_case[n] = mean_dice(pred, load_label_for(img, labels[n]).array, classes)
    return {"dice": float(np.mean(list(per_case.values()))), "per_case": per_case}


@dataclass(frozen=True)
class Decision:
    deploy: bool
    message: str


def decide(k: int, score: float | None, deployed_round: int, deployed_score: float | None,
           tolerance: float = 0.0) -> Decision:
    """Deploy round ``k`` (score ``score``) in place of ``deployed_round`` (score ``deployed_score``)?"""
    if score is None or deployed_score is None:
        return Decision(True, f"round {k} deployed (no quality gate)")
    if score >= deployed_score - tolerance:
        return Decision(True, f"round {k} deployed: held-out gate Dice {score:.4f} >= round {deployed_round}'s "
                              f"{deployed_score:.4f}" + (f" - {tolerance}" if tolerance else ""))
    return Decision(False, f"QUALITY GATE: round {k} NOT deployed: held-out gate Dice {score:.4f} < round "
                           f"{deployed_round}'s {deployed_score:.4f}; keeping round {deployed_round} and stopping "
                           f"refinement (a worse model would feed worse pseudo labels to the next round)")
