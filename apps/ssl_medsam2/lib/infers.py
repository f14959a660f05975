"""Infer tasks: few-shot (SAM2 / atlas) pseudo labels with the datastore's labelled images as supports,
and the deployed nnU-Net version.

Each task returns the label on the request image's own grid, in the format the client asked for
(OHIF: ``result_extension=.nrrd, result_dtype=uint8, result_compress=false``; Slicer and the REST API:
NIfTI by default), and stores its uncertainty: the few-shot outputs (probabilities, entropy, summary)
under ``<state>/fewshot`` and per-image scores in the datastore for the strategies.
Models are built on first use, never at app construction (child processes rebuild the app).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ssl_medsam2 import strategies
from ssl_medsam2.io import InputError, Volume, load_label_for, load_volume, save_like
from ssl_medsam2.preprocess import InputSettings
from ssl_medsam2.protocol import ProtocolSettings
from ssl_medsam2.quality import trusted_classes

from .workspace import Workspace

log = logging.getLogger(__name__)

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nrrd.gz", ".mha", ".mhd")


def label_names(cfg: dict) -> dict[str, int]:
    """Name -> id of the app's classes: input.class_names (or the studies' dataset.json), else class_<id>
    for each of input.classes."""
    inputs = InputSettings.from_config(cfg)
    ids = sorted(inputs.class_names) or list(inputs.classes or ())
    return {inputs.class_name(c): c for c in ids}


def served_labels(ws: Workspace) -> dict[str, int]:
    """Name -> id the models announce in /info/ (OHIF's panel makes one segment per entry): the configured
    classes, else the label set found in the first labels (DICOMweb: their SEGs' segment names), else
    nothing. Why: with none announced, OHIF holds every class in one segment and cannot export it."""
    configured = label_names(ws.cfg)
    if configured:
        return configured
    names, ids = ws.class_names, ws.label_ids or set()
    return {names.get(c) or f"class_{c}": c for c in sorted(set(names) | set(ids)) if c}


RESULT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


def result_format(request: dict) -> tuple[str, np.dtype, bool]:
    """(extension, dtype, compress) the client asked for; InputError before any computation otherwise."""
    ext = str(request.get("result_extension") or ".nii.gz")
    ext = ext if ext.startswith(".") else "." + ext
    if ext not in RESULT_EXTENSIONS:
        raise InputError(None, f"result_extension '{ext}' is not supported (choose from {', '.join(RESULT_EXTENSIONS)})")
    dtype = str(request.get("result_dtype") or "uint8")
    if dtype not in RESULT_DTYPES:
        raise InputError(None, f"result_dtype '{dtype}' is not supported (choose from {', '.join(RESULT_DTYPES)})")
    compress = str(request.get("result_compress", "true")).lower() not in ("false", "0", "no")
    return ext, np.dtype(dtype), compress


def write_result(label: np.ndarray, image: Volume, request: dict) -> str:
    """Write a canonical-order label on the image's source grid in the requested format; returns the path."""
    ext, dtype, compress = result_format(request)
    fd, nii = tempfile.mkstemp(suffix=".nii.gz" if ext != ".nii" else ".nii", prefix="ssl_medsam2_")
    os.close(fd)
    try:
        save_like(label, image, nii, dtype=dtype, description="ssl-medsam2 label")
    except BaseException:
        os.unlink(nii)
        raise
    if ext in (".nii.gz", ".nii"):
        return nii
    import SimpleITK as sitk

    fd, out = tempfile.mkstemp(suffix=ext, prefix="ssl_medsam2_")
    os.close(fd)
    try:  # temp files are removed on every path (a failed conversion left both behind)
        sitk.WriteImage(sitk.ReadImage(nii), out, useCompression=compress)
    except BaseException:
        os.unlink(out)
        raise
    finally:
        os.unlink(nii)
    return out


def _start(task: InferTask, what: str, request: dict) -> tuple[float, Volume, str | None]:
    """What every infer task does first: (start time, the request's image, its datastore id or None);
    a RuntimeError with the reason while ``task`` is unavailable."""
    t0 = time.time()
    ok, reason = task.availability()
    if not ok:
        raise RuntimeError(f"{what} unavailable: {reason}")
    path = request.get("image")
    if not isinstance(path, str):
        raise InputError(None, "this task needs an image file or a datastore image id")
    image_id = request.get("image_id")
    return t0, load_volume(path, name=image_id or None), image_id


def _uncertainty(ws: Workspace, entropy: np.ndarray, label: np.ndarray, classes) -> float | None:
    return strategies.uncertainty_score(entropy, label, classes, ProtocolSettings.from_config(ws.cfg).boundary_band)


def sam2_missing_reason(missing: dict) -> str:
    """Why SAM2 is unavailable, in the server's terms (its --conf, its other models). The full path stays in
    the server's own log and /info; a client's 503 shows the file name only."""
    return (f"SAM2 checkpoint file '{missing['file']}' is not at the path sam2.checkpoint names "
            f"({missing['path']}, also in the server log at start)"
            + (f"; download it from {missing['url']}" if missing["url"] else "")
            + "; put it there, or restart the server with --conf sam2.checkpoint <path to the file>. Meanwhile "
              "the atlas_fewshot model makes few-shot pseudo labels without any weights")


class _ServedLabels:
    def info(self):
        meta = super().info()
        meta["labels"] = served_labels(self.ws)
        return meta


class FewShotInfer(_ServedLabels, InferTask):
    """Few-shot pseudo label of one image; supports = datastore images with final labels."""

    def __init__(self, ws: Workspace, engine: str, description: str):
        super().__init__(type=InferType.SEGMENTATION, labels=label_names(ws.cfg), dimension=3,
                         description=description,
                         config={"top_k": ws.app.fewshot_top_k,
                                 "result_extension": ".nii.gz", "result_dtype": "uint8"})
        self.ws = ws
        self.engine_name = engine
        self._engine = None
        self._lock = threading.Lock()

    def availability(self) -> tuple[bool, str]:
        """(available, reason): SAM2 needs weights (or sam2.checkpoint=none for tests); both need the engine."""
        try:
            if self.engine_name in ("sam2", "ensemble"):
                from ssl_medsam2.engines.sam2_model import missing_checkpoint

                missing = missing_checkpoint(self.ws.cfg)
                if missing:
                    return False, sam2_missing_reason(missing)
        except Exception as exc:  # an import problem must show in /info, not crash the app
            return False, f"{type(exc).__name__}: {exc}"
        return True, "ok"

    def is_valid(self) -> bool:
        return self.availability()[0]

    def engine(self):
        with self._lock:
            if self._engine is None:
                from ssl_medsam2.engines import build_engine

                self._engine = build_engine(self.engine_name, self.ws.cfg)
            return self._engine

    def supports(self, query: Volume, image_id: str | None, top_k: int):
        from ssl_medsam2.engines import Case

        labelled = {k: v for k, v in self.ws.final_labelled().items() if k != image_id}
        if not labelled:
            raise InputError(None, "no image in the datastore has a final label yet: save at least one "
                                   "label (tag 'final') before asking for a few-shot pseudo label")
        names = sorted(labelled)
        if top_k and top_k < len(names):
            grid = self.ws.app.embedding_grid
            q = strategies.image_embedding(query.array, grid)
            pool = {k: strategies.image_embedding(load_volume(labelled[k][0]).array, grid) for k in names}
            names = strategies.most_similar(q, pool, top_k)
        cases = []
        for k in names:
            img = load_volume(labelled[k][0], name=k)
            label = load_label_for(img, labelled[k][1])
            if not label.array.any():  # "no organ in this scan" is a valid final label, but shows no organ
                log.warning("%s: its final label is empty; not used as a few-shot support", k)
                continue
            cases.append(Case(img, label))
        if not cases:
            raise InputError(None, "every final label is empty: save at least one label that shows an organ "
                                   "before asking for a few-shot pseudo label")
        return cases

    def compute(self, query: Volume, image_id: str | None, top_k: int, executor=None) -> tuple[dict, float | None]:
        """One pseudo label from the current supports: (outputs, uncertainty). A datastore image gets its
        few-shot outputs (``<state>/fewshot``) and scores stored. With ``executor`` (the pseudo-label queue's
        Ray executor; a datastore image only) the engine runs there, on the same supports and settings."""
        from ssl_medsam2.engines import Case
        from ssl_medsam2.pseudo_label import pseudo_label_case, pseudo_label_case_on

        supports = self.supports(query, image_id, top_k)
        out_dir = self.ws.fewshot_dir if image_id else None
        if executor is not None:
            outputs = pseudo_label_case_on(executor, self.engine_name, supports, Case(query), self.ws.cfg, out_dir)
        else:
            outputs = pseudo_label_case(self.engine(), supports, Case(query), self.ws.cfg, out_dir=out_dir)
        s = outputs["summary"]
        u = _uncertainty(self.ws, outputs["entropy"], outputs["label"], s["classes"])
        if image_id:
            self.ws.set_scores(image_id, {"ssl_uncertainty": u, "ssl_fewshot_engine": self.engine_name,
                                          "ssl_fewshot_random_weights": bool(s.get("random_weights", False)),
                                          **self.ws.quality_scores(s)})
        return outputs, u

    def describe(self, summary: dict, uncertainty: float | None) -> dict:
        """The response fields of one pseudo label (also what the pseudo-label store keeps with it)."""
        return {"engine": self.engine_name, "supports": summary.get("supports"), "uncertainty": uncertainty,
                "quality": (summary.get("quality") or {}).get("score"), "failed": bool(summary.get("failed", False)),
                "passed_classes": sorted(trusted_classes(summary.get("quality"))),
                "mean_entropy_inside": summary.get("mean_entropy_inside"),
                "mean_entropy_boundary": summary.get("mean_entropy_boundary"),
                "random_weights": bool(summary.get("random_weights", False))}

    def __call__(self, request):
        t0, query, image_id = _start(self, f"{self.engine_name} few-shot task", request)
        top_k = int(request.get("top_k", self.config()["top_k"]) or 0)
        ahead = getattr(self.ws, "pseudo_ahead", None)  # the server's store + queue (None in child processes)
        if ahead is not None and image_id and ahead.serves(self, top_k):
            label, meta = ahead.answer(self, image_id, fresh=str(request.get("fresh", "")).lower() in ("true", "1", "yes"))
            return write_result(label_on(query, label), query, request), {
                "label_names": label_names(self.ws.cfg), **meta, "latencies": {"total": round(time.time() - t0, 3)}}
        outputs, u = self.compute(query, image_id, top_k)
        result = write_result(outputs["label"], query, request)
        return result, {"label_names": label_names(self.ws.cfg), **self.describe(outputs["summary"], u),
                        "stored": outputs.get("paths", {}), "latencies": {"total": round(time.time() - t0, 3)}}


def label_on(image: Volume, label_path: str) -> np.ndarray:
    """A stored label file as a canonical-order array on ``image``'s grid (geometry checked)."""
    return load_label_for(image, label_path).array


class NnUNetInfer(_ServedLabels, InferTask):
    """The deployed nnU-Net version; a newly promoted (or rolled back) version is used on the next request."""

    def __init__(self, ws: Workspace):
        super().__init__(type=InferType.SEGMENTATION, labels=label_names(ws.cfg), dimension=3,
                         description="nnU-Net trained by ssl_nnunet on final + pseudo labels (deployed version)",
                         config={"result_extension": ".nii.gz", "result_dtype": "uint8"})
        self.ws = ws
        self._model = None
        self._model_dir = None
        self._lock = threading.Lock()

    def availability(self) -> tuple[bool, str]:
        """(available, reason); the reason is read from the registry on every call, so it stays current after
        a training that was refused or a model folder that went missing."""
        if self.ws.registry.current_model_dir():
            return True, "ok"
        state = self.ws.registry.state()
        cur = self.ws.registry.current()
        if cur is not None:
            return False, (f"the deployed version {cur['id']} has no model folder on disk any more; roll back "
                           f"(POST /ssl_medsam2/models/rollback) or train again (POST /train/ssl_nnunet)")
        versions = state.get("versions") or []
        if not versions:
            return False, ("no trained model yet: train one with POST /train/ssl_nnunet (the few-shot models work "
                           "meanwhile)")
        last = versions[-1]
        gate = last.get("quality_gate") or {}
        why = gate.get("warning") or gate.get("message") or "it was not better than the deployed one"
        return False, (f"no nnU-Net version is deployed: the last training ({last['id']}, round "
                       f"{last.get('round')}) was not promoted: {why}. The few-shot models serve meanwhile; "
                       f"train again after more labels (POST /train/ssl_nnunet)")

    def is_valid(self) -> bool:
        return self.availability()[0]

    def model(self):
        from ssl_medsam2.nnunet.predict import NnUNetModel

        with self._lock:
            cur = self.ws.registry.current()
            if cur is None:
                raise RuntimeError(self.availability()[1])
            if self._model is None or self._model_dir != cur["model_dir"]:
                log.info("loading nnU-Net model %s (%s)", cur["id"], cur["model_dir"])
                from ssl_medsam2.nnunet.settings import NnUNetSettings

                device = NnUNetSettings.from_config(self.ws.cfg).torch_device()  # auto: cuda when present
                self._model = NnUNetModel(cur["model_dir"], device=device)
                self._model_dir = cur["model_dir"]
            return self._model, cur["id"]

    def __call__(self, request):
        from ssl_medsam2.uncertainty import binary_entropy

        t0, query, image_id = _start(self, "nnunet task", request)
        model, version = self.model()
        label, probs = model.predict_volume(query)
        label = np.asarray(label, dtype=np.uint8)
        u = _uncertainty(self.ws, binary_entropy(probs[1:]), label, list(range(1, probs.shape[0])))
        scores: dict = {"ssl_nnunet_uncertainty": u, "ssl_nnunet_version": version}
        if image_id:
            pred = self.ws.predictions_dir(version) / f"{image_id}.nii.gz"
            save_like(label, query, pred, dtype=np.uint8, description=f"ssl-medsam2 nnunet {version}")
            few = self.ws.fewshot_dir / "labels" / f"{image_id}.nii.gz"
            if few.exists():
                scores["ssl_disagreement"] = strategies.disagreement_score(load_label_for(query, few).array, label)
            self.ws.set_scores(image_id, scores)
        result = write_result(label, query, request)
        return result, {"label_names": label_names(self.ws.cfg), "model_version": version, "uncertainty": u,
                        "disagreement": scores.get("ssl_disagreement"),
                        "latencies": {"total": round(time.time() - t0, 3)}}
