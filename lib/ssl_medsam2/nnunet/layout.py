"""Where everything of a ``run_ssl`` work dir lives: the one place that builds those paths.

The CLI, ``predict``, the MONAI Label app and the benches all go through :class:`RunLayout`
instead of spelling ``round_{k:03d}`` or ``final.json`` themselves::

    work/state.json              what is finished, settings, schedule, quality-gate decisions
    work/final.json              the deployed round (written after every round, not only at the end)
    work/inputs/gate_supports/   links to the labelled cases minus the gate case(s) (their few-shot supports)
    work/round_000/labels/ probabilities/ entropy/ summaries/   few-shot pseudo labels
    work/round_00k/model/        nnU-Net model folder
    work/round_00k/labels/ entropy/      pseudo labels of the unlabelled (and gate) cases
    work/round_00k/labelled_predictions/  predictions of the training-labelled cases (fit)
    work/round_00k/metrics.json  written last: the round is finished      round_00k/curves.png
    work/round_00k/nnunet/ + nnunet.log   nnU-Net's raw/preprocessed/results while the round trains
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class Under:
    """A path attribute, ``<the owner's root attribute>/<parts>``: a layout is a table of names, not a
    property each (the app's ``Workspace`` uses it too)."""

    def __init__(self, root: str, *parts: str):
        self.root, self.parts = root, parts

    def __get__(self, obj, owner=None):
        return self if obj is None else Path(getattr(obj, self.root), *self.parts)


class InRound:
    """A per-round path: ``layout.<name>(k)`` is ``round_{k:03d}/<part>``."""

    def __init__(self, part: str):
        self.part = part

    def __get__(self, obj, owner=None):
        return self if obj is None else (lambda k: obj.round(k) / self.part)


@dataclass(frozen=True)
class RunLayout:
    work: Path

    def __init__(self, work: str | os.PathLike):
        object.__setattr__(self, "work", Path(work).resolve())

    # -- run level --
    state_path = Under("work", "state.json")
    final_path = Under("work", "final.json")
    gate_supports = Under("work", "inputs", "gate_supports")

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        """Is ``path`` a work dir of ``ssl-medsam2 run`` (it has a state.json)?"""
        return RunLayout(path).state_path.exists()

    # -- round level --
    def round(self, k: int) -> Path:
        return self.work / f"round_{int(k):03d}"

    labels = InRound("labels")
    entropy = InRound("entropy")
    model = InRound("model")
    labelled_predictions = InRound("labelled_predictions")
    metrics = InRound("metrics.json")
    curves = InRound("curves.png")
    nnunet_root = InRound("nnunet")
    nnunet_log = InRound("nnunet.log")

    def finished_rounds(self, max_rounds: int | None = None) -> list[dict]:
        """metrics.json of rounds 1, 2, ... that finished (consecutive), oldest first."""
        out, k = [], 1
        while (max_rounds is None or k <= max_rounds) and self.metrics(k).exists():
            out.append(json.loads(self.metrics(k).read_text()))
            k += 1
        return out

    # -- what is deployed --
    def read_final(self) -> dict | None:
        return json.loads(self.final_path.read_text()) if self.final_path.exists() else None

    def deployed_round(self) -> int | None:
        final = self.read_final()
        return None if final is None else int(final["round"])

    def deployed_model_dir(self) -> Path | None:
        """The deployed nnU-Net model folder; None while no round has finished or when round 0 is deployed."""
        final = self.read_final()
        if not final or not final.get("model_dir"):
            return None
        p = Path(final["model_dir"])
        return p if p.is_absolute() else self.work / p

    def deployed_labels_dir(self) -> Path | None:
        """The pseudo labels of the deployed round."""
        k = self.deployed_round()
        return None if k is None else self.labels(k)
