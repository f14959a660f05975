"""Batch few-shot pseudo-labelling handed to a Ray cluster (``--conf cluster.ray_address ADDRESS``).

``POST /batch/infer/<atlas|sam2>_fewshot`` normally runs the infer task image after image in MONAI
Label's batch child process. With a cluster configured, the same images (MONAI Label's own selection:
``images`` = all / unlabeled / a list) are pseudo-labelled by the Ray executor (:mod:`ssl_medsam2.cluster`) in one go:
supports are every image with a final label, each worker keeps its engine for all the queries it gets,
the driver (this child process) writes every case all-or-nothing. Then, as the per-image task does,
each case's outputs go to ``<state>/fewshot/``, its label to the datastore under the batch's label tag
(``pseudo``) and its uncertainty score into the image info. A bad image is reported, the others are kept.
(``app.fewshot_top_k`` is not applied here: every labelled image is a support.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from ssl_medsam2 import strategies
from ssl_medsam2.cluster import RayExecutor, cluster_address
from ssl_medsam2.config import merge
from ssl_medsam2.executors import CasesFailed
from ssl_medsam2.io import case_name, link_or_copy
from ssl_medsam2.protocol import ProtocolSettings
from ssl_medsam2.pseudo_label import OUTPUT_KINDS, case_paths, pseudo_label_folder
from ssl_medsam2.quality import trusted_classes

log = logging.getLogger(__name__)


def batch_fewshot_on_cluster(ws, engine_name: str, request: dict, datastore) -> dict:
    """Pseudo-label the request's images on the configured Ray cluster; returns {image id: outcome}."""
    from monailabel.interfaces.tasks.batch_infer import BatchInferTask

    ids = sorted(BatchInferTask().get_images(request, datastore))
    final = ws.final_labelled()
    queries = [i for i in ids if i not in final]
    label_tag = request.get("label_tag") or ws.pseudo_tag
    work = ws.state_dir / "batch" / f"{engine_name}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"
    try:  # the work folder (links, copies, outputs) goes whatever happens
        names = {}
        for i in queries + sorted(final):
            img = datastore.get_image_uri(i)
            ext = ".nii.gz" if img.endswith(".nii.gz") else Path(img).suffix
            link_or_copy(img, work / "images" / f"{i}{ext}")
            names[case_name(f"{i}{ext}")] = i
            if i in final:
                link_or_copy(final[i][1], work / "labels" / f"{i}{ext}")
        cfg = merge(ws.cfg, {"protocol": {"engine": engine_name}})
        out = work / "out"
        log.info("batch %s on Ray (%s): %d image(s), %d support(s)", engine_name, cluster_address(cfg), len(queries),
                 len(final))
        failed: dict[str, str] = {}
        try:
            pseudo_label_folder(work / "images", work / "labels", out, cfg, show_progress=False,
                                executor=RayExecutor(cfg))
        except CasesFailed as exc:
            failed = exc.failed
        band = ProtocolSettings.from_config(ws.cfg).boundary_band
        result: dict = {}
        for case, image_id in names.items():
            if image_id in final:
                continue
            if case in failed:
                result[image_id] = {"error": failed[case]}
                continue
            src = case_paths(out, case)
            dst = case_paths(ws.fewshot_dir, image_id)
            for k in OUTPUT_KINDS:  # summaries last, as everywhere
                dst[k].parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src[k]), str(dst[k]))
            label = np.asarray(nib.load(str(dst["labels"])).dataobj)
            entropy = np.moveaxis(np.asarray(nib.load(str(dst["entropy"])).dataobj), -1, 0)
            summary = json.loads(dst["summaries"].read_text())
            u = strategies.uncertainty_score(entropy, label, summary["classes"], band)
            datastore.save_label(image_id, str(dst["labels"]), label_tag,
                                 {"source": f"{engine_name}_fewshot", "ray": True,
                                  "passed_classes": sorted(trusted_classes(summary.get("quality")))})
            ws.set_scores(image_id, {"ssl_uncertainty": u, "ssl_fewshot_engine": engine_name,
                                     "ssl_fewshot_random_weights": bool(summary.get("random_weights", False)),
                                     **ws.quality_scores(summary)})
            result[image_id] = {"label": str(dst["labels"]), "uncertainty": u}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result
