"""The app's HTTP routes: MONAI Label's paths, checked first, then the same upstream endpoint functions.

Every route checks names, params and files before anything is written (``guards.py``): a bad request
gets a 4xx with a reason that names no server path and changes nothing. Identity comes from the token
when auth is on. Uploads never replace an existing image unless the request says ``overwrite=true``;
then labels that no longer fit its grid are removed (the others kept). Saved labels are checked
against their image (grid and label set), record who saved them and when, and a final save ends the
image's lease. Params are checked against ``schemas.py`` before any task starts. Files in the
studies folder are never reached through a link that leaves it. MONAI Label routes the product does
not need are switched off here (model upload / delete, whole-slide infer, the DICOMweb proxy on a
local folder); sessions are replaced (no archive is unpacked). Extra routes under ``/ssl_medsam2/``:
model versions and rollback, leases. ``monailabel_085.install_server_routes`` puts these routes in
front of MONAI Label's own (docs/security.md lists every upstream route and what happens to it).
"""

import filecmp
import gzip
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import List, Optional

import nibabel as nib
import numpy as np
from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import remove_file

from ssl_medsam2.io import InputError, load_label_for, load_volume
from ssl_medsam2.leases import LeaseLimitError

from .guards import check_body, check_inside, check_name, identity, parse_params, receive, reject, scratch
from .infers import result_format
from .schemas import INFER, SCORING, STRATEGY, check_params, check_train
from .uploads import check_declared_size, check_image, prepare_label, suffix_of

log = logging.getLogger(__name__)

USER = settings.MONAI_LABEL_AUTH_ROLE_USER
ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
# request fields only the server sets: a client naming them could point a task at another file or id
MAX_SESSION_FILES = 2000  # one DICOM series
SERVER_SET = ("image", "image_id", "model", "label", "session", "session_id", "save_label", "label_tag", "file")


def _404(kind: str, name: str, known) -> Exception:
    return reject(404, f"unknown {kind} '{name}'; available: {', '.join(sorted(known)) or 'none'}")


def _cleanup_now(background: BackgroundTasks) -> None:
    """Run the temp-file removals a failed request queued (FastAPI runs them only after a success)."""
    for task in list(background.tasks):
        if task.func is remove_file:
            task.func(*task.args, **task.kwargs)


def raw_label_as_nifti(path: str, shown_name: str, image_path: str) -> UploadFile:
    """OHIF's raw ``label.bin`` (uint8, Fortran order, one byte per image voxel) as an in-memory NIfTI
    upload on the image's grid: upstream would convert it into a temp file that nothing removes."""
    img = nib.load(image_path)
    need = int(np.prod(img.shape[:3]))
    if os.path.getsize(path) != need:
        raise InputError(shown_name, f"raw label has {os.path.getsize(path)} bytes; the image needs {need} "
                                     f"(uint8, one per voxel)")
    out = nib.Nifti1Image(np.fromfile(path, dtype=np.uint8).reshape(img.shape[:3], order="F"), img.affine, img.header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)
    return UploadFile(file=io.BytesIO(gzip.compress(out.to_bytes(), 1)), filename="label.nii.gz")


def build_router(app) -> APIRouter:
    """Routes bound to one app instance (``app`` is the SSLMedSAM2App)."""
    from monailabel.endpoints import activelearning as al_ep
    from monailabel.endpoints import batch_infer as batch_ep
    from monailabel.endpoints import datastore as ds_ep
    from monailabel.endpoints import infer as infer_ep
    from monailabel.endpoints import scoring as scoring_ep
    from monailabel.endpoints import session as session_ep
    from monailabel.endpoints import train as train_ep

    r = APIRouter()
    ws = app.workspace
    max_bytes = int(ws.app.max_upload_mb * (1 << 20))
    max_voxels = ws.app.max_upload_voxels

    def who(params: dict, user: Optional[User], request: Optional[Request] = None) -> tuple[str, bool]:
        host = request.client.host if request is not None and request.client else ""
        return identity(params, user, settings.MONAI_LABEL_AUTH_ENABLE, host)

    def studies_file(path: Optional[str], what: str) -> None:
        if not str(ws.studies).startswith(("http://", "https://")):
            check_inside(ws.studies, path, what)

    def may_hold_leases(user: Optional[User]) -> bool:
        """Auth on: annotators and admins hold leases; a viewer (role user only) is shown samples, holds none."""
        if not settings.MONAI_LABEL_AUTH_ENABLE:
            return True
        roles = set(getattr(user, "roles", None) or [])
        return bool(roles & {ANNOTATOR, ADMIN, settings.MONAI_LABEL_AUTH_ROLE_REVIEWER})

    def check_model(model: str, for_train: bool = False):
        tasks = app.train_tasks if for_train else app.infer_tasks
        if model not in tasks:
            raise _404("trainer" if for_train else "model", model, tasks)
        if not for_train:
            ok, reason = app.model_availability(model)
            if not ok:
                raise reject(503, f"model '{model}' is unavailable: {reason}")

    def check_image_id(image: str, what: str = "image") -> str:
        """A datastore image by name whose file does not lead out of the studies folder (404 / 409)."""
        check_name(image, f"{what} id")
        if not ws.has_image(image):
            raise reject(404, f"unknown image '{image}' (not in the datastore)")
        studies_file(ws.datastore.get_image_uri(image), f"image '{image}'")
        return image

    def check_tag(tag: str) -> str:
        return check_name(tag, "label tag")

    # ---------------------------------------------------------------- infer / train / strategies
    @r.post("/infer/{model}", summary="Run inference (checked: model, image, params, input file)")
    def infer(request: Request, background_tasks: BackgroundTasks, model: str, image: str = "",
              session_id: str = "", params: str = Form("{}"), file: UploadFile = File(None),
              label: UploadFile = File(None), output: Optional[ResultType] = None, user: User = Depends(RBAC(USER))):
        check_model(model)
        if session_id:
            check_name(session_id, "session id")
            sessions = app.sessions()
            if sessions is None or not sessions.get_session(session_id, update_ts=False):
                raise reject(404, f"unknown session '{session_id}' (expired or never created)")
        if image or (not file and not session_id):  # an image id is always a datastore name, never a path
            if not image:
                raise reject(422, "give an image id of the datastore, a session id or upload a file")
            check_image_id(image)
        p = parse_params(params)
        interactive = getattr(app.infer_tasks[model], "checked_params", None)  # lib/interactive.py
        if interactive is not None:  # clicks: `label` names a segment there, never a file
            p = interactive(p, SERVER_SET, label_file=label is not None, owner=who(p, user, request)[0])
            params = json.dumps(p)
        else:
            fixed = sorted(k for k in p if k in SERVER_SET)
            if fixed:
                raise reject(422, f"params may not set {', '.join(fixed)}: the image is the request's 'image' "
                                  f"query parameter (or an uploaded file)")
            check_params(p, INFER, "infer")
        if label and suffix_of(label.filename) == ".bin" and not image:
            raise reject(422, "a raw label (.bin) needs the datastore image it belongs to ('image')")
        if output == ResultType.dicom_seg and not str(ws.studies).startswith(("http://", "https://")):
            raise reject(422, "output=dicom_seg needs a DICOMweb datastore; this server's studies are a local "
                              "folder (ask for output=image)")
        try:
            result_format({**app.infer_tasks[model].config(), **p})
            with scratch(ws.scratch_root) as tmp:  # the upload limits, before upstream copies the files
                for up, what in ((file, "image"), (label, "label")):
                    if up:
                        ext = suffix_of(up.filename)
                        path = str(receive(up, tmp, what + ext, max_bytes))
                        if ext != ".bin":
                            check_declared_size(path, up.filename or what, max_voxels)
                        else:  # OHIF's raw label: one byte per voxel of the datastore image
                            label = raw_label_as_nifti(path, up.filename or what, ws.datastore.get_image_uri(image))
            return infer_ep.run_inference(background_tasks, model, image, session_id, params, file, label, output)
        except InputError as exc:
            _cleanup_now(background_tasks)
            raise reject(422, str(exc)) from exc
        except BaseException:
            _cleanup_now(background_tasks)
            raise

    @r.post("/batch/infer/{model}", summary="Run batch inference (checked model; CPU-safe defaults)")
    def batch_infer(model: str, images: Optional[str] = "unlabeled", params: Optional[dict] = None,
                    run_sync: Optional[bool] = False, user: User = Depends(RBAC(ADMIN))):
        check_model(model)
        if images not in ("all", "labeled", "unlabeled"):
            raise reject(422, f"images must be all, labeled or unlabeled, got '{images}'")
        params = dict(params or {})
        if "label_tag" in params:
            check_tag(params["label_tag"])
        return batch_ep.run(model, images, app.batch_defaults(model, params), run_sync)

    @r.post("/train/{model}", summary="Run a training task (checked trainer and labels)")
    def train(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
              enqueue: Optional[bool] = False, user: User = Depends(RBAC(ADMIN))):
        check_model(model, for_train=True)
        params = check_train(dict(check_body(params)), model, ws.cfg)
        if not ws.final_labelled():
            raise reject(409, "no image has a final label yet: save labels before training")
        return train_ep.run_model(model, params, run_sync, enqueue)

    @r.post("/activelearning/{strategy}", summary="Next image to annotate (leased to the caller)")
    def activelearning(request: Request, strategy: str, params: Optional[dict] = None,
                       user: User = Depends(RBAC(USER))):
        if strategy not in app.strategy_tasks:
            raise _404("strategy", strategy, app.strategy_tasks)
        params = check_params(dict(check_body(params)), STRATEGY, "strategy")
        holder, anonymous = who(params, user, request)
        params.update(client_id=holder, ssl_anonymous=anonymous, strategy=strategy,
                      ssl_no_lease=not may_hold_leases(user))
        try:
            res = al_ep.sample(strategy, params, holder)
            return {k: v for k, v in res.items() if k != "path"} if isinstance(res, dict) else res
        except LeaseLimitError as exc:
            raise reject(429, f"{exc}. To get in: send the client_id your client already uses (Slicer and "
                              f"MONAILabelClient(client_id=...) do; skipping then moves your own lease), wait "
                              f"until a lease is saved or expires, ask the admin to raise app.anonymous_leases, "
                              f"or log in (auth on: every annotator holds one lease of their own)") from exc

    @r.post("/scoring/{method}", summary="Run a scoring method (checked name)")
    def scoring(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                user: User = Depends(RBAC(ANNOTATOR))):
        if method not in app.scoring_tasks:
            raise _404("scoring method", method, app.scoring_tasks)
        params = check_params(dict(check_body(params)), SCORING, "scoring")
        return scoring_ep.run_method(method, params, run_sync)

    # ---------------------------------------------------------------- labels
    @r.put("/datastore/label", summary="Save a label (checked against its image; records user and time)")
    def save_label(request: Request, image: str, params: str = Form("{}"), tag: str = DefaultLabelTag.FINAL.value,
                   label: UploadFile = File(...), user: User = Depends(RBAC(ANNOTATOR))):
        check_image_id(image)
        tag = check_tag(tag or DefaultLabelTag.FINAL.value)
        p = parse_params(params)
        saver, _ = who(p, user, request)
        if not str(ws.studies).startswith(("http://", "https://")):
            tag_dir = Path(ws.studies) / "labels" / tag
            studies_file(str(tag_dir), f"label folder '{tag}'")
            current = ws.datastore.get_label_uri(image, tag)
            studies_file(current, f"the '{tag}' label of '{image}'")
            for existing in tag_dir.glob(f"{image}.*") if tag_dir.is_dir() else ():
                studies_file(str(existing), f"the '{tag}' label of '{image}'")
        with scratch(ws.scratch_root) as tmp:
            upload = receive(label, tmp, "upload" + suffix_of(label.filename), max_bytes)
            try:
                checked = prepare_label(ws.datastore.get_image_uri(image), str(upload), label.filename or "label",
                                        allowed=ws.label_ids, work_dir=tmp)
            except InputError as exc:
                raise reject(422, str(exc)) from exc
            p.update({"user": saver, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "source_file": label.filename})
            label_id = ws.datastore.save_label(image, checked, tag, p)
        res = app.on_label_saved(image, tag, saver) or {}
        res.update({"image": image, "label": label_id, "tag": tag, "user": saver})
        return res

    @r.delete("/datastore/label", summary="Remove a label (404 for an unknown image or tag)")
    def remove_label(id: str, tag: str, user: User = Depends(RBAC(ADMIN))):
        check_image_id(id)
        check_tag(tag)
        uri = ws.datastore.get_label_uri(id, tag)
        if not uri:
            raise reject(404, f"image '{id}' has no label with tag '{tag}'")
        studies_file(uri, f"the '{tag}' label of '{id}'")
        ws.datastore.remove_label(id, tag)
        return {"image": id, "tag": tag, "removed": True}

    @r.get("/datastore/label/info", summary="Label info (404 for an unknown image or tag)")
    def label_info(label: str, tag: str, user: User = Depends(RBAC(USER))):
        check_image_id(label, "label")
        check_tag(tag)
        if not ws.datastore.get_label_uri(label, tag):
            raise reject(404, f"image '{label}' has no label with tag '{tag}'")
        return ws.datastore.get_label_info(label, tag)

    @r.put("/datastore/label/info", summary="Update label info (checked)")
    def update_label_info(request: Request, label: str, tag: str, info: str = Form("{}"),
                          user: User = Depends(RBAC(ANNOTATOR))):
        return _update_label_info(label, tag, info, user, request)

    @r.put("/datastore/updatelabelinfo", summary="Update label info (deprecated alias, checked)",
           include_in_schema=False)
    def update_label_info_alias(request: Request, label: str, tag: str, params: str = Form("{}"),
                                user: User = Depends(RBAC(ANNOTATOR))):
        """Upstream's alias reads the form field ``params`` (MONAI Label Reviewer sends it), not ``info``."""
        return _update_label_info(label, tag, params, user, request)

    def _update_label_info(label: str, tag: str, info: str, user: Optional[User], request: Request):
        check_image_id(label, "label")
        check_tag(tag)
        if not ws.datastore.get_label_uri(label, tag):
            raise reject(404, f"image '{label}' has no label with tag '{tag}'")
        fields = parse_params(info, "info")
        fields["user"] = who(fields, user, request)[0]
        return ds_ep.update_label_info(label, tag, json.dumps(fields))

    # ---------------------------------------------------------------- images
    def _replace(image_id: str, upload: str, p: dict) -> dict:
        """Overwrite an image; its labels stay only if they still fit the new grid (info kept)."""
        new = load_volume(upload)
        kept, removed, infos = [], [], {}
        for tag in list(ws.datastore.get_labels_by_image_id(image_id)):
            uri = ws.datastore.get_label_uri(image_id, tag)
            infos[tag] = dict(ws.datastore.get_label_info(image_id, tag) or {})
            try:
                load_label_for(new, uri)
                kept.append(tag)
            except InputError:
                ws.datastore.remove_label(image_id, tag)
                removed.append(tag)
        ws.datastore.add_image(image_id, upload, p)
        ws.datastore.refresh()  # re-attaches the label files that were kept
        for tag in kept:
            ws.datastore.update_label_info(image_id, tag, {**infos[tag], "image_replaced_at": int(time.time())})
        return {"image": image_id, "replaced": True, "labels_kept": kept, "labels_removed": removed}

    @r.put("/datastore/", summary="Upload an image (Slicer's route; checked like /datastore/image)",
           include_in_schema=False)
    @r.put("/datastore/image", summary="Upload an image (checked; never replaces one unless overwrite=true)")
    def add_image(request: Request, image: Optional[str] = None, params: str = Form("{}"), overwrite: bool = False,
                  file: UploadFile = File(...), user: User = Depends(RBAC(ANNOTATOR))):
        ext = suffix_of(file.filename)
        if ext not in tuple(e.replace("*", "") for e in settings.MONAI_LABEL_DATASTORE_FILE_EXT):
            raise reject(422, f"{file.filename}: unsupported file type '{ext}'")
        name = (file.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
        image_id = check_name(image if image else name[: -len(ext)] if name.endswith(ext) else name, "image id")
        p = parse_params(params)
        p["user"] = who(p, user, request)[0]
        if ws.has_image(image_id):
            studies_file(ws.datastore.get_image_uri(image_id), f"image '{image_id}'")
        with scratch(ws.scratch_root) as tmp:
            upload = str(receive(file, tmp, "upload" + ext, max_bytes))
            try:
                check_declared_size(upload, file.filename or "image", max_voxels)
                check_image(upload, file.filename or "image")
            except InputError as exc:
                raise reject(422, str(exc)) from exc
            if ws.has_image(image_id):
                current = ws.datastore.get_image_uri(image_id)
                if current and filecmp.cmp(current, upload, shallow=False):
                    return {"image": image_id, "unchanged": True}
                if not overwrite:
                    raise reject(409, f"image '{image_id}' already exists; send overwrite=true to replace it "
                                      f"(its labels are kept only if they fit the new image's grid)")
                stored = suffix_of(current)
                if stored != ext:  # the datastore would keep the old file beside the new one
                    raise reject(422, f"image '{image_id}' is stored as {stored}: send its replacement as "
                                      f"{stored} too (got {ext})")
                try:
                    return _replace(image_id, upload, p)
                except InputError as exc:
                    raise reject(422, str(exc)) from exc
            if ext not in (".nii.gz", ".nii"):
                raise reject(422, f"{file.filename}: new images are stored as NIfTI (.nii.gz or .nii) here: "
                                  f"labels, the few-shot engines and the strategies read NIfTI; convert it first")
            return {"image": ws.datastore.add_image(image_id, upload, p)}

    @r.get("/datastore/image/info", summary="Image info (404 for an unknown image)")
    def image_info(image: str, user: User = Depends(RBAC(USER))):
        check_image_id(image)
        return ws.datastore.get_image_info(image)

    @r.put("/datastore/image/info", summary="Update image info (checked)")
    def update_image_info(request: Request, image: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
        check_image_id(image)
        fields = parse_params(info, "info")
        fields["user"] = who(fields, user, request)[0]
        return ds_ep.update_image_info(image, json.dumps(fields))

    @r.delete("/datastore/", summary="Remove an image and its labels (deprecated alias, checked)",
              include_in_schema=False)
    @r.delete("/datastore/image", summary="Remove an image and its labels (404 for an unknown image)")
    def remove_image(id: str, user: User = Depends(RBAC(ADMIN))):
        check_image_id(id)
        studies_file(ws.datastore.get_image_uri(id), f"image '{id}'")
        for tag in ws.datastore.get_labels_by_image_id(id):
            studies_file(ws.datastore.get_label_uri(id, tag), f"the '{tag}' label of '{id}'")
        ws.datastore.remove_image(id)
        ws.leases.release(id)
        return {}

    # ---------------------------------------------------------------- sessions (ids are joined to a folder)
    def public_session(info: dict) -> dict:
        """A session as clients see it: its image by file name, no server folder."""
        info = {k: v for k, v in dict(info).items() if k != "path"}
        if info.get("image"):
            info["image"] = os.path.basename(str(info["image"]).rstrip("/"))
        return info

    @r.get("/session/{session_id}", summary="Session info (checked id)")
    def get_session(session_id: str, update_ts: bool = False, image: bool = False,
                    user: User = Depends(RBAC(USER))):
        res = session_ep.get_session(check_name(session_id, "session id"), update_ts, image)
        return public_session(res) if isinstance(res, dict) else res

    @r.put("/session/", summary="Create a session from an image (upload limits; archives are not unpacked)")
    def create_session(uncompress: bool = False, expiry: int = 0, files: List[UploadFile] = File(...),
                       user: User = Depends(RBAC(USER))):
        """Replaces MONAI Label's route, which unpacks any tar (absolute, ``..`` and link members write
        anywhere the server may) and skips the upload limits. Here the files of one image are received
        with the same limits as every upload (size while received, declared voxels before decoding) and
        ``uncompress=true`` is refused: send the image file, or the files of one DICOM series."""
        sessions = app.sessions()
        if sessions is None:
            raise reject(406, "sessions are not enabled on this server")
        if uncompress:
            raise reject(422, "archives are not unpacked here (uncompress=true is switched off): send the image "
                              "file itself, or the files of one DICOM series")
        if expiry < 0:
            raise reject(422, f"expiry must be >= 0 seconds (0 = the server's default), got {expiry}")
        if not files or len(files) > MAX_SESSION_FILES:
            raise reject(422, f"send 1 to {MAX_SESSION_FILES} files, got {len(files or [])}")
        allowed = tuple(e.replace("*", "") for e in settings.MONAI_LABEL_DATASTORE_FILE_EXT) + (".dcm",)
        with scratch(ws.scratch_root) as tmp:
            folder = tmp / "session"
            folder.mkdir()
            total_bytes, total_voxels, names = 0, 0, set()
            for f in files:
                name = (f.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
                check_name(name, "file name")
                ext = suffix_of(name)
                if ext not in allowed or name in names:
                    raise reject(422, f"{name}: {'sent twice' if name in names else f'unsupported file type {ext}'}")
                names.add(name)
                path = receive(f, folder, name, max_bytes - total_bytes)
                total_bytes += path.stat().st_size
                try:
                    total_voxels += int(np.prod([max(1, n) for n in check_declared_size(str(path), name, max_voxels)],
                                                dtype=np.float64))
                    if total_voxels > max_voxels:
                        raise InputError(name, f"the files declare more than {max_voxels} voxels together "
                                               f"(app.max_upload_voxels)")
                    if len(files) == 1:
                        check_image(str(path), name)
                except InputError as exc:
                    raise reject(422, str(exc)) from exc
            source = folder / next(iter(names)) if len(files) == 1 else folder
            session_id, info = sessions.add_session(str(source), expiry, False)
        return {"session_id": session_id, "session_info": public_session(info.to_json())}

    @r.delete("/session/{session_id}", summary="Delete a session (checked id)")
    def remove_session(session_id: str, user: User = Depends(RBAC(USER))):
        return session_ep.remove_session(check_name(session_id, "session id"))

    # ---------------------------------------------------------------- MONAI Label routes switched off / wrapped
    @r.get("/datastore/image", summary="Download an image (checked id; no link out of the studies folder)")
    def download_image(image: str, user: User = Depends(RBAC(USER))):
        return ds_ep.download_image(check_image_id(image))

    @r.head("/datastore/image", summary="Check that an image exists (checked id)")
    def check_image_exists(image: str, check_sum: Optional[str] = None, user: User = Depends(RBAC(USER))):
        return ds_ep.download_image(check_image_id(image), check_only=True, check_sum=check_sum)

    def checked_label(image: str, tag: str) -> None:
        check_image_id(image, "label")
        check_tag(tag)
        uri = ws.datastore.get_label_uri(image, tag)
        if not uri:
            raise reject(404, f"image '{image}' has no label with tag '{tag}'")
        studies_file(uri, f"the '{tag}' label of '{image}'")

    @r.get("/datastore/label", summary="Download a label (checked; no link out of the studies folder)")
    def download_label(label: str, tag: str, user: User = Depends(RBAC(USER))):
        checked_label(label, tag)
        return ds_ep.download_label(label, tag)

    @r.head("/datastore/label", summary="Check that a label exists (checked)")
    def check_label_exists(image: str, tag: str, user: User = Depends(RBAC(USER))):
        checked_label(image, tag)
        return ds_ep.download_label(image, tag, check_only=True)

    @r.post("/train/", summary="Run every trainer (checked params per trainer)", include_in_schema=False)
    def train_all(params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = Depends(RBAC(ADMIN))):
        """MONAI Label's deprecated 'run all trainers': params are ``{trainer: {params}}``, checked like
        ``/train/{model}``'s."""
        params = dict(check_body(params))
        for name, sub in params.items():
            if name not in app.train_tasks:
                raise _404("trainer", name, app.train_tasks)
            params[name] = check_train(dict(check_body(sub, f"params for {name}")), name, ws.cfg)
        if not ws.final_labelled():
            raise reject(409, "no image has a final label yet: save labels before training")
        return train_ep.run(params, run_sync)

    @r.post("/scoring/", summary="Run every scoring method (checked params)", include_in_schema=False)
    def scoring_all(params: Optional[dict] = None, run_sync: Optional[bool] = False,
                    user: User = Depends(RBAC(ANNOTATOR))):
        params = dict(check_body(params))
        for name, sub in params.items():
            if name not in app.scoring_tasks:
                raise _404("scoring method", name, app.scoring_tasks)
            check_params(dict(check_body(sub, f"params for {name}")), SCORING, "scoring")
        return scoring_ep.run(params, run_sync)

    @r.post("/infer/wsi/{model}", include_in_schema=False)
    @r.post("/infer/wsi_v2/{model}", include_in_schema=False)
    def wsi_off(model: str, user: User = Depends(RBAC(USER))):
        """MONAI Label's whole-slide (pathology) inference: this app has no such model."""
        raise reject(404, "this server has no whole-slide (WSI) models; run the 3D infer route with an image id")


    @r.put("/model/{model}", summary="Switched off: models come from training runs (admin only)")
    @r.delete("/model/{model}", summary="Switched off: models come from training runs (admin only)")
    def model_file(model: str, user: User = Depends(RBAC(ADMIN))):
        """MONAI Label's model upload / delete (annotator role upstream, the upload kept on disk, 500s)."""
        raise reject(405, "model files are not uploaded or deleted over HTTP on this server: nnU-Net models "
                          "come from runs of the ssl_nnunet trainer, and an earlier version is deployed with the "
                          "app's models rollback route")

    @r.get("/datastore/dataset", summary="Download the dataset as a ZIP (temp file removed after sending)")
    def download_dataset(limit_cases: Optional[int] = None, user: User = Depends(RBAC(ANNOTATOR))):
        if limit_cases is not None and limit_cases < 1:
            raise reject(422, f"limit_cases must be >= 1, got {limit_cases}")
        if not hasattr(ws.datastore, "datalist") or str(ws.studies).startswith(("http://", "https://")):
            raise reject(404, "dataset export is only available for a local studies folder")
        items = ws.datastore.datalist()
        if not items:
            raise reject(404, "the datastore has no labelled image to export")
        for d in items:
            for key, path in d.items():
                studies_file(path, f"{key} {os.path.basename(str(path))}")
        path = ws.datastore.get_dataset_archive(limit_cases)
        from starlette.background import BackgroundTask

        return FileResponse(path, media_type="application/zip", filename="dataset.zip",
                            background=BackgroundTask(remove_file, path))

    if not str(ws.studies).startswith(("http://", "https://")):
        @r.get("/proxy/dicom/{path:path}", include_in_schema=False)
        @r.post("/proxy/dicom/{path:path}", include_in_schema=False)
        def proxy_off(path: str, user: User = Depends(RBAC(USER))):
            """MONAI Label's DICOMweb proxy would send requests to the studies *folder* as a URL (500)."""
            raise reject(404, "no DICOMweb proxy: this server's studies are a local folder, not a DICOMweb server")

    # ---------------------------------------------------------------- extra routes
    @r.get("/ssl_medsam2/models", summary="nnU-Net model versions and the deployed one")
    def models(user: User = Depends(RBAC(USER))):
        return ws.registry.state()

    @r.post("/ssl_medsam2/models/rollback", summary="Deploy an earlier model version (default: the previous one)")
    def rollback(version: Optional[str] = None, user: User = Depends(RBAC(ADMIN))):
        if version is not None:
            check_name(version, "version")
        try:
            return ws.registry.set_current(version, why="rollback")
        except KeyError as exc:
            raise reject(404, str(exc.args[0])) from exc

    @r.get("/ssl_medsam2/leases", summary="Active annotation leases")
    def leases(user: User = Depends(RBAC(USER))):
        return {k: vars(v) for k, v in ws.leases.active().items()}

    @r.delete("/ssl_medsam2/leases/{image}", summary="Give back your own lease on an image")
    def release_lease(request: Request, image: str, client_id: Optional[str] = None, user: User = Depends(RBAC(USER))):
        check_name(image, "image id")
        holder, _ = who({"client_id": client_id} if client_id else {}, user, request)
        if not ws.leases.release(image, holder=holder):
            raise reject(404, f"'{holder}' holds no lease on '{image}'")
        return {"released": image}

    return r


def install_routes(fastapi_app, app) -> None:
    """Put the guarded routes (and the login / OHIF fixes) in front of MONAI Label's; idempotent."""
    import monailabel_085

    monailabel_085.install_server_routes(fastapi_app, build_router(app))
