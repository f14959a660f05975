"""Interactive correction models that 3D Slicer and OHIF show and drive unchanged (a thin shell over
``ssl_medsam2.interactive``).

| model | MONAI Label type | client panel | answer |
|---|---|---|---|
| ``smart_edit`` | deepgrow | Slicer Smart Edit | binary: 1 = the edited organ (Slicer puts value 1 into the segment) |
| ``point_prompts`` | deepedit | OHIF Point Prompts, Slicer Smart Edit (deepedit) | label map, value n = n-th organ |
| ``point_prompts_vista`` | vista3d | OHIF Point Prompts (and its auto-segmentation tab) | label map of the asked organs |
| ``scribbles`` | scribbles | Slicer Scribbles | binary: 1 = the selected organ |

Every answer is the base label (:func:`base_label`) plus every click of the request, recomputed; only
a region around the clicks changes, other organs are kept, nothing is saved (the annotator saves). The
prepared image and base label are cached per client (token user or ``client_id``) and image.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask

from ssl_medsam2 import interactive
from ssl_medsam2.interactive import requests as rq
from ssl_medsam2.interactive.cache import ClientCache
from ssl_medsam2.interactive.compose import corrected_label, organ_mask
from ssl_medsam2.interactive.settings import InteractiveSettings
from ssl_medsam2.io import InputError, Volume, load_label_for, load_volume
from ssl_medsam2.preprocess import class_name
from ssl_medsam2.quality import trusted_classes

from .appearance import AppearanceStore
from .guards import reject
from .infers import label_names, sam2_missing_reason, write_result
from .schemas import INFER, boolean, check_params, integer, optional, scalar_list, text
from .workspace import FINAL_TAG, Workspace

log = logging.getLogger(__name__)

DEEPGROW, DEEPEDIT, VISTA3D, SCRIBBLES = "deepgrow", "deepedit", "vista3d", "scribbles"
#: request keys the route sets after its checks (clients cannot send them: they are in no schema)
LABEL_NAME, OWNER = "ssl_label_name", "ssl_owner"


def organ_names(ws: Workspace) -> dict[str, int]:
    """Name -> class id of the organs: ``input.class_names`` / the studies' dataset.json / ``input.classes``,
    else ``class_<id>`` for each id in the final labels already saved (so that /info lists names and
    Slicer has segments to send)."""
    names = label_names(ws.cfg)
    if names:
        return names
    return {class_name({}, c): c for c in sorted(ws.label_ids or ()) if c}


class BaseLabel(NamedTuple):
    """Where a correction starts: ``path`` (None: an empty label) and the organs it is ``trusted`` for."""

    path: str | None
    trusted: frozenset[int] | None  # class ids held to firmly (a final label: None = every organ)

    def trusted_ids(self, ids) -> frozenset[int]:
        return frozenset(ids) if self.trusted is None else self.trusted


def base_label(ws: Workspace, image_id: str | None) -> BaseLabel:
    """The label a correction starts from: the image's latest final label (trusted: a person saved it), else
    its pseudo label, trusted for the organs that passed the quality gate (``passed_classes``, see
    :func:`ssl_medsam2.quality.trusted_classes`), else an empty one. The pseudo label is the one a client's
    auto segment gets by default: the stored few-shot result while it is current (lib/pseudo_ahead.py), else
    the datastore's pseudo tag (a few-shot batch keeps ``passed_classes`` in the label's info; nnU-Net rounds
    measure no per-organ quality, so none is trusted), else the latest few-shot output (its summary's
    quality). The one place that decides it."""
    if not image_id:
        return BaseLabel(None, frozenset())
    final = ws.datastore.get_label_uri(image_id, FINAL_TAG)
    if final and os.path.isfile(final):
        return BaseLabel(final, None)
    rec = ws.stored_pseudo_label(image_id)
    if rec and rec.get("current") is True and os.path.isfile(rec["path"]):
        return BaseLabel(rec["path"], _class_ids(rec.get("passed_classes")))
    uri = ws.datastore.get_label_uri(image_id, ws.pseudo_tag)
    if uri and os.path.isfile(uri):
        info = ws.datastore.get_label_info(image_id, ws.pseudo_tag) or {}
        return BaseLabel(uri, _class_ids(info.get("passed_classes")))
    few = ws.fewshot_dir / "labels" / f"{image_id}.nii.gz"
    if not few.is_file():
        return BaseLabel(None, frozenset())
    try:
        quality = json.loads((ws.fewshot_dir / "summaries" / f"{image_id}.json").read_text()).get("quality")
    except (OSError, ValueError, AttributeError):
        quality = None
    return BaseLabel(str(few), trusted_classes(quality))


def _class_ids(value) -> frozenset[int]:
    """A stored list of class ids (label info can be edited by clients: anything else counts as none)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return frozenset()
    return frozenset(value)


def _fingerprint(path: str | None):
    if not path:
        return None
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@dataclass
class ImageState:
    """What the first click on an image prepares and the next clicks reuse."""

    volume: Volume
    prepared: interactive.PreparedVolume
    base: np.ndarray  # class ids, canonical order
    trusted: frozenset[int]  # the organs whose base is held to firmly (BaseLabel.trusted)


POINTS = scalar_list(1000, 2)
EXTRA = {  # what each client sends beyond INFER's keys (Slicer adds the model's /info config too)
    DEEPGROW: {"label": text(), "roi": scalar_list(6), "reset_state": boolean, "slice": optional(integer())},
    DEEPEDIT: {"label": text(), "roi": scalar_list(6), "reset_state": boolean, "slice": optional(integer())},
    VISTA3D: {},
    SCRIBBLES: {"roi": scalar_list(6), "selected_label_name": text()},
}
POINT_KEYS = {DEEPGROW: ("foreground", "background"), VISTA3D: ("points",), SCRIBBLES: ()}


class InteractiveInfer(InferTask):
    """One interactive model; ``kind`` is its MONAI Label type (what the clients list it under)."""

    def __init__(self, ws: Workspace, kind: str, description: str, cache: ClientCache,
                 looks: AppearanceStore | None = None):
        self.ws, self.kind, self.cache, self.looks = ws, kind, cache, looks
        self.organs = rq.Organs.from_map(organ_names(ws))
        self.settings = InteractiveSettings.from_config(ws.cfg)
        labels = self.organs.positions()
        if kind in (DEEPEDIT, VISTA3D):  # background clicks: Slicer deepedit and OHIF need a 'background' label;
            labels[rq.BACKGROUND] = len(labels) + 1  # not 0: OHIF maps a falsy id onto another organ's value
        super().__init__(type=kind, labels=labels, dimension=3, description=description,
                         config={"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False})

    def is_valid(self) -> bool:
        return True

    def availability(self) -> tuple[bool, str]:
        """Weight-free engines always; ``interactive.engine: sam2`` only with its weights (else the reason,
        which the infer route answers as a 503 and /info lists)."""
        if self.settings.engine != "sam2":
            return True, "ok"
        try:
            from ssl_medsam2.engines.sam2_model import missing_checkpoint

            missing = missing_checkpoint(self.ws.cfg)
        except Exception as exc:  # a bad sam2 section must show in /info, not crash the app
            return False, f"{type(exc).__name__}: {exc}"
        if missing:
            return False, (f"interactive.engine is sam2 and {sam2_missing_reason(missing)}; or restart with "
                           f"--conf interactive.engine graphcut (weight-free)")
        return True, "ok"

    # -- the edge: called by the infer route before anything runs --
    def checked_params(self, p: dict, server_set, *, label_file: bool, owner: str) -> dict:
        """The request's params checked for this model (422 with a reason otherwise), with the segment name
        moved out of ``label`` (MONAI Label's request key for an uploaded file's path) and the caller's
        identity added."""
        named = self.kind in (DEEPGROW, DEEPEDIT)
        fixed = sorted(k for k in p if k in server_set and not (named and k == "label"))
        if fixed:
            raise reject(422, f"params may not set {', '.join(fixed)}: the image is the request's 'image' query "
                              f"parameter" + (" and the segmentation the uploaded label file" if self.kind == SCRIBBLES
                                              else ""))
        schema = {**INFER, **EXTRA[self.kind]}
        point_keys = POINT_KEYS.get(self.kind)
        if self.kind == DEEPEDIT:
            point_keys = (rq.BACKGROUND, *self.organs.names, *rq.NO_LABEL_KEYS)
            schema.update({k: POINTS for k in point_keys})
        unknown = [k for k in p if k not in schema]
        if unknown and self.kind == DEEPEDIT:
            raise reject(422, f"unknown params or label names {', '.join(map(repr, sorted(unknown)))}; this "
                              f"server's organs: "
                              f"{', '.join(self.organs.names) or 'none'} (and '{rq.BACKGROUND}')")
        check_params(p, schema, "infer")
        n = rq.count_points(p, point_keys)
        if n > self.settings.max_points:
            raise reject(422, f"{n} points in one request; this server takes at most "
                              f"{self.settings.max_points} (interactive.max_points)")
        if label_file and self.kind != SCRIBBLES:
            raise reject(422, f"model type {self.kind} takes no label file: the organ is named in 'label' and "
                              f"the base label is the server's")
        if not label_file and self.kind == SCRIBBLES:
            raise reject(422, "scribbles need the segmentation with the 'foreground_scribbles' / "
                              "'background_scribbles' segments uploaded as the label file (as 3D Slicer sends it)")
        if self.kind == DEEPGROW and not p.get("label"):
            raise reject(422, rq.DEEPGROW_NEEDS_A_NAME)
        try:  # the organ named by Slicer's scribbles, before any work
            if self.kind == SCRIBBLES:
                self.organs.class_id(p.get("selected_label_name") or "", "selected_label_name")
        except InputError as exc:
            raise reject(422, str(exc)) from exc
        p = dict(p)
        if "label" in p:
            name = p.pop("label")
            if self.kind == DEEPGROW or name != rq.BACKGROUND:
                try:
                    self.organs.class_id(name)
                except InputError as exc:
                    raise reject(422, str(exc)) from exc
            p[LABEL_NAME] = name
        p[OWNER] = owner
        return p

    # -- the work --
    def state(self, request: dict) -> tuple[ImageState, bool]:
        path, image_id = request["image"], request.get("image_id") or None
        base = base_label(self.ws, image_id)

        def build() -> ImageState:
            vol = load_volume(path, name=image_id)
            label = load_label_for(vol, base.path).array if base.path else np.zeros(vol.shape, np.uint8)
            return ImageState(vol, interactive.prepare(vol.array, vol.spacing), label,
                              base.trusted_ids(self.organs.ids))

        return self.cache.get(str(request.get(OWNER) or "local"), image_id or str(path),
                              (_fingerprint(path), _fingerprint(base.path), base.trusted), build)

    def __call__(self, request):
        t0 = time.time()
        if not isinstance(request.get("image"), str):
            raise InputError(None, "this model needs a datastore image id (or a session)")
        st, cached = self.state(request)
        t1 = time.time()
        vol, box = st.volume, rq.canonical_box(st.volume, request.get("roi"))
        looks = self.looks.current() if self.looks else None  # learned from the final labels so far (None: not yet)
        engine = dict(box=box, settings=self.ws.cfg, trusted=st.trusted, appearance=looks)
        try:
            if self.kind == DEEPGROW:
                edit = rq.deepgrow_edit(request.get(LABEL_NAME), request, self.organs, vol)
                out = organ_mask(st.prepared, st.base, edit, **engine).astype(np.uint8)
                changed = int((out.astype(bool) != (st.base == edit.class_id)).sum())
                names = {self.organs.names[self.organs.ids.index(edit.class_id)]: 1}
            elif self.kind == SCRIBBLES:
                out, changed, names = self._scribbles(request, st, engine)
            else:
                if self.kind == DEEPEDIT:
                    edits, asked = rq.deepedit_edits(request, self.organs, vol), list(self.organs.ids)
                else:
                    asked, edit = rq.vista_edit(request, self.organs, vol)
                    edits = [edit] if edit is not None else []
                label = corrected_label(st.prepared, st.base, edits, **engine)
                changed = int((label != st.base).sum())
                out = np.zeros(label.shape, np.uint8)
                for pos, cid in enumerate(self.organs.ids, start=1):
                    if cid in asked:
                        out[label == cid] = pos
                names = {n: p for n, p in self.organs.positions().items() if self.organs.class_id(n) in asked}
        except InputError:
            raise
        except ValueError as exc:  # the engine's own refusals (e.g. its point bound) are the client's to fix
            raise InputError(None, str(exc)) from exc
        t2 = time.time()
        result = write_result(out, vol, request)
        return result, {"label_names": names, "changed_voxels": changed, "cached": cached,
                        "appearance_images": len(looks.images) if looks is not None else 0,
                        "latencies": {"prepare": round(t1 - t0, 3), "correct": round(t2 - t1, 3),
                                      "total": round(time.time() - t0, 3)}}

    def _scribbles(self, request: dict, st: ImageState, engine: dict):
        from .uploads import prepare_label

        upload = request.get("label")
        if not isinstance(upload, str) or not os.path.isfile(upload):
            raise InputError(None, "scribbles need the segmentation uploaded as the label file")
        checked = prepare_label(str(request["image"]), upload, "scribbles label", allowed=None,
                                work_dir=self.ws.scratch_root)
        try:
            seg = load_label_for(st.volume, checked).array
        finally:
            os.unlink(checked)
        cid, fg, bg, shown = rq.scribble_masks(request, seg, self.organs)
        base = st.base if shown is None else shown  # what the annotator's segmentation shows now
        out = organ_mask(st.prepared, base, rq.Edit(cid), fg_scribble=fg, bg_scribble=bg, **engine)
        name = self.organs.names[self.organs.ids.index(cid)]
        return out.astype(np.uint8), int((out != (base == cid)).sum()), {name: 1}


def interactive_tasks(ws: Workspace) -> dict[str, InteractiveInfer]:
    """The four interactive models, sharing one per-client cache bounded by ``interactive.cache_mb`` and the
    organ looks learned from the final labels (learned in the background: the server starts it, and every
    click checks that they are current)."""
    cache = ClientCache(int(InteractiveSettings.from_config(ws.cfg).cache_mb * (1 << 20)))
    looks = AppearanceStore(ws, rq.Organs.from_map(organ_names(ws)).ids)
    return {
        "smart_edit": InteractiveInfer(ws, DEEPGROW, "Correct one organ with foreground / background clicks "
                                                     "(3D Slicer Smart Edit); starts from the image's final or "
                                                     "pseudo label", cache, looks),
        "point_prompts": InteractiveInfer(ws, DEEPEDIT, "Correct organs with points per organ (OHIF Point "
                                                        "Prompts, Slicer deepedit); starts from the image's final "
                                                        "or pseudo label", cache, looks),
        "point_prompts_vista": InteractiveInfer(ws, VISTA3D, "Correct one organ with positive / negative points "
                                                             "(OHIF Point Prompts, VISTA-3D style)", cache, looks),
        "scribbles": InteractiveInfer(ws, SCRIBBLES, "Correct one organ with foreground / background scribbles "
                                                     "(3D Slicer Scribbles)", cache, looks),
    }
