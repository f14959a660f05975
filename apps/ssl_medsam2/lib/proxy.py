"""The DICOMweb proxy (``/proxy/dicom/...``) on a DICOMweb datastore: reads forwarded, stores checked.

MONAI Label 0.8.5's proxy forwards any request with every header (the user's token included) to the
PACS, and any POST stores whatever it carries. Here a read goes on with only the headers the PACS needs
(``ssl_medsam2.dicomweb.pacs_headers``) and comes back with the PACS's address replaced by the proxy's;
a POST on any proxy route is a STOW-RS that must carry one DICOM-SEG of an image of the datastore, on
that image's grid, whose segments name the app's classes. Such a SEG (OHIF's *Export DICOM SEG*)
becomes a final label through the app's one save path (``routes.store_label``): saver recorded, lease
ended, retraining counted, caches current; the app writes the SEG to the PACS itself. Anything else is
a 4xx with a reason and nothing reaches the PACS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import requests
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

from ssl_medsam2.config import Section
from ssl_medsam2.dicom_seg import read_seg, seg_to_nifti
from ssl_medsam2.dicomweb import answer_headers, hide_address, pacs_headers, stow_objects
from ssl_medsam2.io import InputError

from .guards import reject, scratch

log = logging.getLogger(__name__)
OPS = ("wado", "qido", "stow", "")


@dataclass(frozen=True)
class ProxySettings(Section):
    """The ``dicomweb_proxy:`` section of the config (configs/ssl_medsam2.yaml says what each key means)."""

    SECTION = "dicomweb_proxy"
    forward_user_token: bool
    timeout_s: float

    def __post_init__(self):
        self._set(forward_user_token=bool(self.forward_user_token), timeout_s=float(self.timeout_s))


def _pacs_path(op: str, path: str) -> str:
    """The PACS path of a proxy path, with MONAI Label's prefixes (as its own proxy maps them)."""
    prefix = {"wado": settings.MONAI_LABEL_WADO_PREFIX, "qido": settings.MONAI_LABEL_QIDO_PREFIX,
              "stow": settings.MONAI_LABEL_STOW_PREFIX}.get(op) or ""
    if op == "qido" and path.endswith("metadata"):  # some OHIF versions ask metadata through qido
        prefix = settings.MONAI_LABEL_WADO_PREFIX or ""
    return f"{prefix}/{path}" if prefix else path


def _study_of(path: str) -> str | None:
    """'' for ``studies``, the study UID for ``studies/<uid>``; None for any other path (no STOW target)."""
    parts = [p for p in path.split("/") if p]
    if parts == ["studies"]:
        return ""
    if len(parts) == 2 and parts[0] == "studies":
        return parts[1]
    return None


def add_proxy_routes(r: APIRouter, app, store_label, who, check_image_id) -> None:
    """``/proxy/dicom/{wado,qido,stow,}/...``: GET forwarded (trimmed headers, PACS address hidden),
    POST = a checked DICOM-SEG saved as a final label (annotators; with auth off, only such a SEG)."""
    ws = app.workspace
    cfg = ProxySettings.from_config(ws.cfg)
    server = settings.MONAI_LABEL_STUDIES.rstrip("/")
    max_bytes = int(ws.app.max_upload_mb * (1 << 20))
    user_name = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
    password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
    basic = (user_name, password) if user_name and password else None

    def read(request: Request, op: str, path: str) -> Response:
        url = f"{server}/{_pacs_path(op, path)}"
        try:
            resp = requests.get(url, params=request.url.query or None, auth=basic, timeout=cfg.timeout_s,
                                headers=pacs_headers(request.headers, cfg.forward_user_token))
        except requests.Timeout as exc:
            raise reject(504, f"the PACS did not answer within {cfg.timeout_s:.0f} s "
                              f"(dicomweb_proxy.timeout_s)") from exc
        except requests.RequestException as exc:
            raise reject(502, "the PACS cannot be reached") from exc
        body = resp.content
        if "json" in resp.headers.get("content-type", "").lower() or "xml" in resp.headers.get("content-type", ""):
            body = hide_address(body, server, str(request.base_url).rstrip("/") + "/proxy/dicom/wado")
        return Response(content=body, status_code=resp.status_code, headers=answer_headers(resp.headers))

    def store(body: bytes, content_type: str, study: str, saver: str) -> dict:
        try:
            objects = stow_objects(body, content_type)
            if len(objects) != 1:
                raise InputError("STOW request", f"send one DICOM-SEG per request (got {len(objects)} objects)")
            seg = read_seg(objects[0])
            if study and seg.study != study:
                raise InputError("DICOM-SEG", f"belongs to study {seg.study}, not to the study {study} of the URL")
            check_image_id(seg.referenced_series, "referenced series")
            ids = ws.segment_ids(seg.segments)
            with scratch(ws.scratch_root) as tmp:
                label = seg_to_nifti(seg, ws.datastore.get_image_uri(seg.referenced_series), tmp / "seg_label.nii.gz",
                                     ids)
                p = {"source": "DICOM-SEG (STOW)", "segments": {str(k): v for k, v in seg.segments.items()},
                     "stowed_sop_instance": str(seg.dataset.get("SOPInstanceUID", ""))}
                return store_label(seg.referenced_series, str(label), "DICOM-SEG", "final", p, saver, tmp)
        except InputError as exc:
            raise reject(422, f"not stored: {exc}") from exc

    async def stow(request: Request, op: str, path: str, user: User) -> JSONResponse:
        study = _study_of(path)
        if study is None:
            raise reject(405, f"not stored: POST is STOW-RS only (POST /proxy/dicom/{op + '/' if op else ''}studies "
                              f"with one DICOM-SEG), not '{path}'")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise reject(413, f"not stored: larger than the server's limit of {max_bytes >> 20} MB "
                                  f"(app.max_upload_mb)")
            chunks.append(chunk)
        saver, _ = who(dict(request.query_params), user, request)
        res = await run_in_threadpool(store, b"".join(chunks), request.headers.get("content-type", ""), study, saver)
        log.info("DICOM-SEG stored through the proxy as the final label of %s by %s", res.get("image"), saver)
        return JSONResponse(res)

    def routes(op: str):
        base = f"/proxy/dicom/{op}/" if op else "/proxy/dicom/"

        @r.get(base + "{path:path}", include_in_schema=False)
        def proxy_read(request: Request, path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
            return read(request, op, path)

        @r.post(base + "{path:path}", include_in_schema=False)
        async def proxy_store(request: Request, path: str,
                              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
            return await stow(request, op, path, user)

    for op in OPS:
        routes(op)
