"""The app's HTTP routes: MONAI Label's paths, checked first, then the same upstream endpoint functions.

Every route checks names, params and files before anything is written (``guards.py``): a bad request
gets a 4xx with a reason that names no server path and changes nothing. Identity comes from the token
when auth is on. Uploads never replace an existing image unless the request says ``overwrite=true``;
then labels that no longer fit its grid are removed (the others kept). Saved labels are checked
against their image (grid and label set), record who saved them and when, and a final save ends the
image's lease. Extra routes under ``/ssl_medsam2/``: model versions and rollback, leases.
``monailabel_085.install_server_routes`` puts these routes in front of MONAI Label's own.
"""

import filecmp
import json
import logging
import time
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, UploadFile
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import remove_file

from ssl_medsam2.io import InputError, load_label_for, load_volume
from ssl_medsam2.leases import LeaseLimitError

from .guards import check_name, identity, parse_params, receive, reject, scratch
from .infers import result_format
from .uploads import check_declared_size, check_image, prepare_label, suffix_of

log = logging.getLogger(__name__)

USER = settings.MONAI_LABEL_AUTH_ROLE_USER
ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
# request fields only the server sets: a client naming them could point a task at another file or id
SERVER_SET = ("image", "image_id", "model", "label", "session", "session_id", "save_label", "label_tag", "file")


def _404(kind: str, name: str, known) -> Exception:
    return reject(404, f"unknown {kind} '{name}'; available: {', '.join(sorted(known)) or 'none'}")


def _cleanup_now(background: BackgroundTasks) -> None:
    """Run the temp-file removals a failed request queued (FastAPI runs them only after a success)."""
    for task in list(background.tasks):
        if task.func is remove_file:
            task.func(*task.args, **task.kwargs)


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

    def who(params: dict, user: Optional[User]) -> tuple[str, bool]:
        return identity(params, user, settings.MONAI_LABEL_AUTH_ENABLE)

    def check_model(model: str, for_train: bool = False):
        tasks = app.train_tasks if for_train else app.infer_tasks
        if model not in tasks:
            raise _404("trainer" if for_train else "model", model, tasks)
        if not for_train:
            ok, reason = app.model_availability(model)
            if not ok:
                raise reject(503, f"model '{model}' is unavailable: {reason}")

    def check_image_id(image: str, what: str = "image") -> str:
        check_name(image, f"{what} id")
        if not ws.has_image(image):
            raise reject(404, f"unknown image '{image}' (not in the datastore)")
        return image

    def check_tag(tag: str) -> str:
        return check_name(tag, "label tag")

    # ---------------------------------------------------------------- infer / train / strategies
    @r.post("/infer/{model}", summary="Run inference (checked: model, image, params, input file)")
    def infer(background_tasks: BackgroundTasks, model: str, image: str = "", session_id: str = "",
              params: str = Form("{}"), file: UploadFile = File(None), label: UploadFile = File(None),
              output: Optional[ResultType] = None, user: User = Depends(RBAC(USER))):
        check_model(model)
        if session_id:
            check_name(session_id, "session id")
        if not file and not session_id:
            if not image:
                raise reject(422, "give an image id of the datastore or upload a file")
            check_image_id(image)
        p = parse_params(params)
        fixed = sorted(k for k in p if k in SERVER_SET)
        if fixed:
            raise reject(422, f"params may not set {', '.join(fixed)}: the image is the request's 'image' "
                              f"query parameter (or an uploaded file)")
        try:
            result_format({**app.infer_tasks[model].config(), **p})
            with scratch(ws.scratch_root) as tmp:  # the upload limits, before upstream copies the files
                for up, what in ((file, "image"), (label, "label")):
                    if up:
                        ext = suffix_of(up.filename)
                        path = str(receive(up, tmp, what + ext, max_bytes))
                        if ext != ".bin":  # OHIF's raw label: its size is the image's (upstream checks)
                            check_declared_size(path, up.filename or what, max_voxels)
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
        if not ws.final_labelled():
            raise reject(409, "no image has a final label yet: save labels before training")
        return train_ep.run_model(model, params, run_sync, enqueue)

    @r.post("/activelearning/{strategy}", summary="Next image to annotate (leased to the caller)")
    def activelearning(strategy: str, params: Optional[dict] = None, user: User = Depends(RBAC(USER))):
        if strategy not in app.strategy_tasks:
            raise _404("strategy", strategy, app.strategy_tasks)
        params = dict(params or {})
        holder, anonymous = who(params, user)
        params.update(client_id=holder, ssl_anonymous=anonymous, strategy=strategy)
        try:
            return al_ep.sample(strategy, params, holder)
        except LeaseLimitError as exc:
            raise reject(429, f"{exc} (app.anonymous_leases; turn auth on to identify annotators)") from exc

    @r.post("/scoring/{method}", summary="Run a scoring method (checked name)")
    def scoring(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                user: User = Depends(RBAC(ANNOTATOR))):
        if method not in app.scoring_tasks:
            raise _404("scoring method", method, app.scoring_tasks)
        return scoring_ep.run_method(method, params, run_sync)

    # ---------------------------------------------------------------- labels
    @r.put("/datastore/label", summary="Save a label (checked against its image; records user and time)")
    def save_label(image: str, params: str = Form("{}"), tag: str = DefaultLabelTag.FINAL.value,
                   label: UploadFile = File(...), user: User = Depends(RBAC(ANNOTATOR))):
        check_image_id(image)
        tag = check_tag(tag or DefaultLabelTag.FINAL.value)
        p = parse_params(params)
        saver, _ = who(p, user)
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

    @r.get("/datastore/label/info", summary="Label info (404 for an unknown image or tag)")
    def label_info(label: str, tag: str, user: User = Depends(RBAC(USER))):
        check_image_id(label, "label")
        check_tag(tag)
        if not ws.datastore.get_label_uri(label, tag):
            raise reject(404, f"image '{label}' has no label with tag '{tag}'")
        return ws.datastore.get_label_info(label, tag)

    @r.put("/datastore/label/info", summary="Update label info (checked)")
    def update_label_info(label: str, tag: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
        return _update_label_info(label, tag, info, user)

    @r.put("/datastore/updatelabelinfo", summary="Update label info (deprecated alias, checked)",
           include_in_schema=False)
    def update_label_info_alias(label: str, tag: str, params: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
        """Upstream's alias reads the form field ``params`` (MONAI Label Reviewer sends it), not ``info``."""
        return _update_label_info(label, tag, params, user)

    def _update_label_info(label: str, tag: str, info: str, user: Optional[User]):
        check_image_id(label, "label")
        check_tag(tag)
        if not ws.datastore.get_label_uri(label, tag):
            raise reject(404, f"image '{label}' has no label with tag '{tag}'")
        fields = parse_params(info, "info")
        fields["user"] = who(fields, user)[0]
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
    def add_image(image: Optional[str] = None, params: str = Form("{}"), overwrite: bool = False,
                  file: UploadFile = File(...), user: User = Depends(RBAC(ANNOTATOR))):
        ext = suffix_of(file.filename)
        if ext not in tuple(e.replace("*", "") for e in settings.MONAI_LABEL_DATASTORE_FILE_EXT):
            raise reject(422, f"{file.filename}: unsupported file type '{ext}'")
        name = (file.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
        image_id = check_name(image if image else name[: -len(ext)] if name.endswith(ext) else name, "image id")
        p = parse_params(params)
        p["user"] = who(p, user)[0]
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
            return {"image": ws.datastore.add_image(image_id, upload, p)}

    @r.get("/datastore/image/info", summary="Image info (404 for an unknown image)")
    def image_info(image: str, user: User = Depends(RBAC(USER))):
        check_image_id(image)
        return ws.datastore.get_image_info(image)

    @r.put("/datastore/image/info", summary="Update image info (checked)")
    def update_image_info(image: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
        check_image_id(image)
        fields = parse_params(info, "info")
        fields["user"] = who(fields, user)[0]
        return ds_ep.update_image_info(image, json.dumps(fields))

    @r.delete("/datastore/", summary="Remove an image and its labels (deprecated alias, checked)",
              include_in_schema=False)
    @r.delete("/datastore/image", summary="Remove an image and its labels (404 for an unknown image)")
    def remove_image(id: str, user: User = Depends(RBAC(ADMIN))):
        check_image_id(id)
        ws.datastore.remove_image(id)
        ws.leases.release(id)
        return {}

    # ---------------------------------------------------------------- sessions (ids are joined to a folder)
    @r.get("/session/{session_id}", summary="Session info (checked id)")
    def get_session(session_id: str, update_ts: bool = False, image: bool = False,
                    user: User = Depends(RBAC(USER))):
        return session_ep.get_session(check_name(session_id, "session id"), update_ts, image)

    @r.delete("/session/{session_id}", summary="Delete a session (checked id)")
    def remove_session(session_id: str, user: User = Depends(RBAC(USER))):
        return session_ep.remove_session(check_name(session_id, "session id"))

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
    def release_lease(image: str, client_id: Optional[str] = None, user: User = Depends(RBAC(USER))):
        check_name(image, "image id")
        holder, _ = who({"client_id": client_id} if client_id else {}, user)
        if not ws.leases.release(image, holder=holder):
            raise reject(404, f"'{holder}' holds no lease on '{image}'")
        return {"released": image}

    return r


def install_routes(fastapi_app, app) -> None:
    """Put the guarded routes (and the login / OHIF fixes) in front of MONAI Label's; idempotent."""
    import monailabel_085

    monailabel_085.install_server_routes(fastapi_app, build_router(app))
