"""Scoring methods: per-image scores written into the datastore's image info for the strategies.

``uncertainty``: mean entropy of the stored few-shot probabilities inside and around the pseudo mask,
and the summary's quality gate verdict (a failed pseudo label is ranked first by the strategy).
``disagreement``: 1 - Dice between the stored few-shot pseudo label and the deployed nnU-Net's prediction
(predicted here, once per model version, when not already stored by an ``nnunet`` infer).
Both only read what infer tasks stored, so they are cheap to rerun; both skip images without outputs.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from monailabel.interfaces.tasks.scoring import ScoringMethod

from ssl_medsam2 import strategies
from ssl_medsam2.io import load_label_for, load_volume, save_like
from ssl_medsam2.protocol import ProtocolSettings

from .workspace import Workspace

log = logging.getLogger(__name__)


def _load_4d_canonical(image, path) -> np.ndarray:
    """A 4D (X,Y,Z,C) NIfTI written by save_like -> (C, X, Y, Z) in the image's canonical order."""
    import nibabel as nib

    arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., None]
    return image.in_canonical_order(np.moveaxis(arr, -1, 0))


class UncertaintyScoring(ScoringMethod):
    def __init__(self, ws: Workspace):
        super().__init__("Few-shot pseudo-label uncertainty: mean entropy inside and around the mask")
        self.ws = ws

    def __call__(self, request, datastore):
        d = self.ws.fewshot_dir
        band = ProtocolSettings.from_config(self.ws.cfg).boundary_band
        out = {}
        for i in self.ws.image_ids():
            lab, ent, summ = d / "labels" / f"{i}.nii.gz", d / "entropy" / f"{i}.nii.gz", d / "summaries" / f"{i}.json"
            if not (lab.exists() and ent.exists() and summ.exists()):
                continue
            image = load_volume(datastore.get_image_uri(i), name=i)
            label = load_label_for(image, lab).array
            summary = json.loads(summ.read_text())
            u = strategies.uncertainty_score(_load_4d_canonical(image, ent), label, summary["classes"], band)
            self.ws.set_scores(i, {"ssl_uncertainty": u, **self.ws.quality_scores(summary)})
            out[i] = u
        log.info("uncertainty scores: %s", out)
        return {"scored": out}


class DisagreementScoring(ScoringMethod):
    def __init__(self, ws: Workspace):
        super().__init__("1 - Dice between the few-shot pseudo label and the deployed nnU-Net prediction")
        self.ws = ws

    def __call__(self, request, datastore):
        cur = self.ws.registry.current()
        if cur is None:
            log.info("disagreement: no deployed nnU-Net model yet, nothing to score")
            return {"scored": {}, "reason": "no deployed nnU-Net model yet"}
        model = None
        out = {}
        for i in self.ws.image_ids():
            few = self.ws.fewshot_dir / "labels" / f"{i}.nii.gz"
            if not few.exists():
                continue
            image = load_volume(datastore.get_image_uri(i), name=i)
            pred_path = self.ws.predictions_dir(cur["id"]) / f"{i}.nii.gz"
            if pred_path.exists():
                pred = load_label_for(image, pred_path).array
            else:
                if model is None:
                    from ssl_medsam2.nnunet.predict import NnUNetModel
                    from ssl_medsam2.nnunet.settings import NnUNetSettings

                    model = NnUNetModel(cur["model_dir"], device=NnUNetSettings.from_config(self.ws.cfg).torch_device())
                pred = np.asarray(model.predict_volume(image)[0], dtype=np.uint8)
                save_like(pred, image, pred_path, dtype=np.uint8, description=f"ssl-medsam2 nnunet {cur['id']}")
            v = strategies.disagreement_score(load_label_for(image, few).array, pred)
            self.ws.set_scores(i, {"ssl_disagreement": v, "ssl_nnunet_version": cur["id"]})
            out[i] = v
        log.info("disagreement scores: %s", out)
        return {"scored": out, "model_version": cur["id"]}
