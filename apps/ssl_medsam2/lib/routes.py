"""HTTP guards and extra routes, installed in front of MONAI Label's own routes.

MONAI Label 0.8.5 answers an unknown model / strategy / image with a bare 500 and stores any uploaded
label as-is. These routes check names and files first (404 / 422 / 503 with a reason; a rejected
request changes nothing in the datastore), record who saved a label and when, release the image's
lease, then call the same upstream endpoint functions, so clients (OHIF, Slicer, REST) see the same API.
Extra routes under ``/ssl_medsam2/``: model versions and rollback, leases.
"""

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import remove_file

from ssl_medsam2.io import InputError

from .uploads import check_image, prepare_label, suffix_of

log = logging.getLogger(__name__)

USER = settings.MONAI_LABEL_AUTH_ROLE_USER
ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN


def _404(kind: str, name: str, known) -> HTTPException:
    return HTTPException(404, detail=f"unknown {kind} '{name}'; available: {', '.join(sorted(known)) or 'none'}")


def _save_upload(upload: UploadFile, background: BackgroundTasks) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix_of(upload.filename), prefix="ssl_medsam2_upload_")
    with os.fdopen(fd, "wb") as fh:
        shutil.copyfileobj(upload.file, fh)
    background.add_task(remove_file, path)
    upload.file.seek(0)
    return path


def _user_of(params: dict, user: Optional[User]) -> str:
    """Who is asking: the request's client_id / user, else the authenticated user (not the auth-off 'admin')."""
    name = params.get("client_id") or params.get("user")
    if not name and user is not None and settings.MONAI_LABEL_AUTH_ENABLE:
        name = user.username
    return str(name) if name else ""


def build_router(app) -> APIRouter:
    """Routes bound to one app instance (``app`` is the SSLMedSAM2App)."""
    from monailabel.endpoints import activelearning as al_ep
    from monailabel.endpoints import batch_infer as batch_ep
    from monailabel.endpoints import infer as infer_ep
    from monailabel.endpoints import scoring as scoring_ep
    from monailabel.endpoints import train as train_ep

    r = APIRouter()
    ws = app.workspace

    def check_model(model: str, for_train: bool = False):
        tasks = app._trainers if for_train else app._infers
        if model not in tasks:
            raise _404("trainer" if for_train else "model", model, tasks)
        if not for_train:
            ok, reason = app.model_availability(model)
            if not ok:
                raise HTTPException(503, detail=f"model '{model}' is unavailable: {reason}")

    def check_image_id(image: str):
        if image and not ws.has_image(image):
            raise HTTPException(404, detail=f"unknown image '{image}' (not in the datastore)")

    @r.post("/infer/{model}", summary="Run inference (checked: model, image, input file)")
    def infer(background_tasks: BackgroundTasks, model: str, image: str = "", session_id: str = "",
              params: str = Form("{}"), file: UploadFile = File(None), label: UploadFile = File(None),
              output: Optional[ResultType] = None, user: User = Depends(RBAC(USER))):
        check_model(model)
        if not file and not session_id:
            if not image:
                raise HTTPException(422, detail="give an image id of the datastore or upload a file")
            check_image_id(image)
        try:
            json.loads(params or "{}")
        except json.JSONDecodeError as exc:
            raise HTTPException(422, detail=f"params is not valid JSON: {exc}") from exc
        try:
            return infer_ep.run_inference(background_tasks, model, image, session_id, params, file, label, output)
        except InputError as exc:
            raise HTTPException(422, detail=str(exc)) from exc

    @r.post("/batch/infer/{model}", summary="Run batch inference (checked model; CPU-safe defaults)")
    def batch_infer(model: str, images: Optional[str] = "unlabeled", params: Optional[dict] = None,
                    run_sync: Optional[bool] = False, user: User = Depends(RBAC(ADMIN))):
        check_model(model)
        if images not in ("all", "labeled", "unlabeled"):
            raise HTTPException(422, detail=f"images must be all, labeled or unlabeled, got '{images}'")
        params = dict(params or {})
        return batch_ep.run(model, images, app.batch_defaults(model, params), run_sync)

    @r.post("/train/{model}", summary="Run a training task (checked trainer and labels)")
    def train(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
              enqueue: Optional[bool] = False, user: User = Depends(RBAC(ADMIN))):
        check_model(model, for_train=True)
        if not ws.final_labelled():
            raise HTTPException(409, detail="no image has a final label yet: save labels before training")
        return train_ep.run_model(model, params, run_sync, enqueue)

    @r.post("/activelearning/{strategy}", summary="Next image to annotate (leased to the caller)")
    def activelearning(strategy: str, params: Optional[dict] = None, user: User = Depends(RBAC(USER))):
        if strategy not in app._strategies:
            raise _404("strategy", strategy, app._strategies)
        params = dict(params or {})
        params["client_id"] = _user_of(params, user) or f"anonymous-{uuid.uuid4().hex[:8]}"
        return al_ep.sample(strategy, params, user.username)

    @r.post("/scoring/{method}", summary="Run a scoring method (checked name)")
    def scoring(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                user: User = Depends(RBAC(ANNOTATOR))):
        if method not in app._scoring_methods:
            raise _404("scoring method", method, app._scoring_methods)
        return scoring_ep.run_method(method, params, run_sync)

    @r.put("/datastore/label", summary="Save a label (checked against its image; records user and time)")
    def save_label(background_tasks: BackgroundTasks, image: str, params: str = Form("{}"),
                   tag: str = DefaultLabelTag.FINAL.value, label: UploadFile = File(...),
                   user: User = Depends(RBAC(ANNOTATOR))):
        check_image_id(image)
        if not image:
            raise HTTPException(422, detail="image id is required")
        try:
            p = json.loads(params) if params else {}
        except json.JSONDecodeError as exc:
            raise HTTPException(422, detail=f"params is not valid JSON: {exc}") from exc
        tag = tag or DefaultLabelTag.FINAL.value
        if not tag.replace("_", "").replace("-", "").isalnum():
            raise HTTPException(422, detail=f"label tag '{tag}' must be letters, digits, - or _")
        upload = _save_upload(label, background_tasks)
        try:
            checked = prepare_label(ws.datastore.get_image_uri(image), upload, label.filename or "label")
        except InputError as exc:
            raise HTTPException(422, detail=str(exc)) from exc
        background_tasks.add_task(remove_file, checked)
        who = _user_of(p, user) or user.username
        p.update({"user": who, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "source_file": label.filename})
        label_id = ws.datastore.save_label(image, checked, tag, p)
        res = app.on_label_saved(image, tag, who) or {}
        res.update({"image": image, "label": label_id, "tag": tag, "user": who})
        return res

    @r.put("/datastore/", summary="Upload an image (Slicer's route; checked like /datastore/image)")
    @r.put("/datastore/image", summary="Upload an image (checked: readable 3D volume)")
    def add_image(background_tasks: BackgroundTasks, image: Optional[str] = None, params: str = Form("{}"),
                  file: UploadFile = File(...), user: User = Depends(RBAC(ANNOTATOR))):
        ext = suffix_of(file.filename)
        if ext not in tuple(e.replace("*", "") for e in settings.MONAI_LABEL_DATASTORE_FILE_EXT):
            raise HTTPException(422, detail=f"{file.filename}: unsupported file type '{ext}'")
        try:
            p = json.loads(params) if params else {}
        except json.JSONDecodeError as exc:
            raise HTTPException(422, detail=f"params is not valid JSON: {exc}") from exc
        upload = _save_upload(file, background_tasks)
        try:
            check_image(upload, file.filename or "image")
        except InputError as exc:
            raise HTTPException(422, detail=str(exc)) from exc
        image_id = image or os.path.basename(file.filename or "image").replace(ext, "")
        p["user"] = _user_of(p, user) or user.username
        return {"image": ws.datastore.add_image(image_id, upload, p)}

    @r.get("/datastore/image/info", summary="Image info (404 for an unknown image)")
    def image_info(image: str, user: User = Depends(RBAC(USER))):
        check_image_id(image)
        return ws.datastore.get_image_info(image)

    @r.delete("/datastore/", summary="Remove an image and its labels (deprecated alias, checked)")
    @r.delete("/datastore/image", summary="Remove an image and its labels (404 for an unknown image)")
    def remove_image(id: str, user: User = Depends(RBAC(ADMIN))):
        check_image_id(id)
        ws.datastore.remove_image(id)
        ws.leases.release(id)
        return {}

    # --- extra routes ---
    @r.get("/ssl_medsam2/models", summary="nnU-Net model versions and the deployed one")
    def models(user: User = Depends(RBAC(USER))):
        return ws.registry.state()

    @r.post("/ssl_medsam2/models/rollback", summary="Deploy an earlier model version (default: the previous one)")
    def rollback(version: Optional[str] = None, user: User = Depends(RBAC(ADMIN))):
        try:
            return ws.registry.set_current(version, why="rollback")
        except KeyError as exc:
            raise HTTPException(404, detail=str(exc.args[0])) from exc

    @r.get("/ssl_medsam2/leases", summary="Active annotation leases")
    def leases(user: User = Depends(RBAC(USER))):
        return {k: vars(v) for k, v in ws.leases.active().items()}

    return r


def install_routes(fastapi_app, app) -> None:
    """Put the guarded routes in front of MONAI Label's (same paths win by order); idempotent."""
    if getattr(fastapi_app.state, "ssl_medsam2_routes", False):
        return
    router = build_router(app)
    prefix = settings.MONAI_LABEL_API_STR or ""
    new = []
    for route in router.routes:
        if isinstance(route, APIRoute):
            fastapi_app.add_api_route(prefix + route.path, route.endpoint, methods=list(route.methods),
                                      summary=route.summary, tags=["SSL-MedSAM2"])
            new.append(fastapi_app.router.routes.pop())
    fastapi_app.router.routes[0:0] = new
    fastapi_app.openapi_schema = None
    fastapi_app.state.ssl_medsam2_routes = True
    log.info("installed %d guarded routes", len(new))
