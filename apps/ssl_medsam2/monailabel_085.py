"""Every workaround for MONAI Label 0.8.5 in one place (this app patches nothing else of MONAI Label).

``PATCHED_VERSION`` is the MONAI Label release these fixes were written and tested against;
:func:`install` (called when ``main.py`` is imported) on another release stops the server at start (the
fixes reach into that release's internals and must be re-checked, not silently applied). Public hooks are used where 0.8.5 has them
(``MONAILabelApp.init_datastore``, ``on_init_complete``, FastAPI routes); the rest is named below.

What and why:

1. **Token check** (``from_token``): upstream calls ``jwt.decode`` without ``algorithms=``, which PyJWT 2
   rejects, so with auth on every valid token fails. Ours pins asymmetric algorithms (an HS256 token
   keyed with the public key, or ``alg: none``, is refused), takes the key from the Keycloak realm's
   ``public_key`` or the issuer's JWKS by ``kid``, verifies signature, expiry, issuer (the realm URI)
   and party (``azp`` or ``aud`` is ``MONAI_LABEL_AUTH_CLIENT_ID``), and reads roles from
   ``MONAI_LABEL_AUTH_TOKEN_ROLES``. Replaces ``monailabel.endpoints.user.auth.from_token`` (looked up
   at call time by ``get_current_user``, which every ``RBAC`` dependency uses).
2. **Login** (``POST /auth/token``): upstream turns a wrong password into a 500 (``raise_for_status``);
   ours answers 401 (502 when the issuer cannot be reached), never echoing the issuer's body.
3. **OHIF** (``/ohif/``): upstream needs a token for static files (a browser cannot attach one to a
   ``<script>`` load) and joins sub-paths with ``os.pathsep`` (returns index.html for every asset).
   Ours serves the files token-free and path-correct, and, with auth on, puts a small login step in
   front of the viewer: ``index.html`` first loads ``ssl_medsam2_auth.js``, which sends the user to
   ``ssl_medsam2_login.html`` when there is no token, and adds ``Authorization: Bearer`` to every
   same-origin request OHIF makes (XHR and fetch: DICOMweb proxy, MONAI Label panel).
4. **Datastore file** (``LocalDatastore._update_datastore_file``): upstream truncates
   ``datastore_v2.json`` and rewrites it in place, so readers see it empty or half-written, and a
   server that finds it damaged refuses to start. Ours writes a temp file in the same folder, fsyncs
   it, renames it over the old one, and keeps ``.datastore_v2.json.last_good``; at start a damaged
   file is replaced by the last good copy (the damaged one kept beside it) and the server says so.
   0.8.5 reloads the file only on a watchdog "modified" event; a rename is a "moved" event, so the
   file watcher's ``on_moved`` reloads it too (else writes by child processes, e.g. scores, are never
   seen and the server's next write drops them).
5. **DICOMweb** (``DICOMWebDatastore``): dcmqi from the PyPI wheel (upstream downloads it at start);
   the image list / labelled set caches (2 h by default) are cleared after every save and upload;
   ``get_label_uri(image_id, "final")`` finds the DICOM-SEG referencing the image; SEGs are converted
   to NIfTI on the image's own grid (``final_label_on_grid``; 0.8.5 cuts them to the slices they
   cover); image / label info leaves out the PACS's ``RetrieveURL``; an image series is cached only
   whole (``whole_series_image_uri``: 0.8.5 kept a series read while it was still arriving, one slice
   long, for good). Uses the datastore's private ``_client``, ``_fetch_by_frame`` and ``_dicom_info``.
6. **Routes** (``install_in_front``): upstream's endpoints answer bad names with 500 and trust the
   request; the app's guarded routes are put in front of them on the same paths (FastAPI matches in
   order), so every client keeps the same API.
7. **Rescoring** (``set_auto_update_scoring``): the app's ``app.auto_update_scoring`` sets the private
   flag 0.8.5 reads once from ``MONAI_LABEL_AUTO_UPDATE_SCORING`` (every rescoring is a child process).

Hooks: ``main.py`` calls :func:`install` at import (patches 1 and 5, in every process MONAI Label starts);
``SSLMedSAM2App.init_datastore`` uses :func:`local_datastore` (4); ``on_init_complete`` calls
:func:`install_server_routes` in the server process (2, 3, 6).
"""

from __future__ import annotations

import functools
import json
import logging
import mimetypes
import os
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.security import OAuth2PasswordRequestForm

logger = logging.getLogger(__name__)

PATCHED_VERSION = "0.8.5"
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
LAST_GOOD_SUFFIX = ".last_good"

_lock = threading.Lock()
_installed = False


def check_version() -> str:
    """The installed MONAI Label version; RuntimeError unless it is the one these fixes were made for."""
    import monailabel

    found = str(getattr(monailabel, "__version__", "unknown"))
    if found.split("+")[0] != PATCHED_VERSION:
        raise RuntimeError(f"apps/ssl_medsam2 patches MONAI Label {PATCHED_VERSION} (monailabel_085.py) but "
                           f"{found} is installed: install monailabel=={PATCHED_VERSION} or re-check every fix "
                           f"listed in monailabel_085.py against {found}")
    return found


def _settings():
    from monailabel.config import settings

    return settings


# ---------------------------------------------------------------- 1. token check
_realm_cache: dict[str, dict] = {}
_jwk_clients: dict[str, object] = {}


def _realm_document(realm_uri: str) -> dict:
    import requests

    r = requests.get(realm_uri, timeout=_settings().MONAI_LABEL_AUTH_TIMEOUT)
    r.raise_for_status()
    return r.json()


def signing_key(token: str, realm_uri: str):
    """The issuer's public key for ``token``: Keycloak's realm ``public_key``, else the JWKS key by ``kid``."""
    import jwt

    doc = _realm_cache.get(realm_uri)
    if doc is None:
        try:
            doc = _realm_document(realm_uri)
        except Exception as exc:  # unreachable issuer: treat like any other failed check, never as a pass
            raise jwt.InvalidTokenError(f"cannot fetch the auth realm {realm_uri}: {exc}") from exc
        _realm_cache[realm_uri] = doc
    if doc.get("public_key"):
        return f"-----BEGIN PUBLIC KEY-----\n{doc['public_key']}\n-----END PUBLIC KEY-----"
    client = _jwk_clients.get(realm_uri)
    if client is None:
        from monailabel.endpoints.user.auth import open_id_configuration

        jwks_uri = doc.get("jwks_uri") or open_id_configuration(realm_uri).get("jwks_uri")
        if not jwks_uri:
            raise jwt.InvalidTokenError(f"auth realm {realm_uri} publishes neither public_key nor jwks_uri")
        client = jwt.PyJWKClient(jwks_uri, cache_keys=True, timeout=_settings().MONAI_LABEL_AUTH_TIMEOUT)
        _jwk_clients[realm_uri] = client
    try:
        return client.get_signing_key_from_jwt(token).key
    except jwt.PyJWKClientError as exc:
        raise jwt.InvalidTokenError(str(exc)) from exc


def _roles(payload: dict, path: str) -> list[str]:
    node = payload
    for key in path.split("#"):
        node = node.get(key) if isinstance(node, dict) else None
    return [str(r) for r in node] if isinstance(node, (list, tuple)) else []


def from_token(token: str):
    """Drop-in for ``monailabel.endpoints.user.auth.from_token`` that names its algorithms. Any failure
    is an ``InvalidTokenError`` (upstream turns those into 401; anything else would be a 500), e.g. an
    ES256 token checked against the realm's RSA key."""
    import jwt

    try:
        return _verified_user(token)
    except jwt.InvalidTokenError:
        raise
    except Exception as exc:
        raise jwt.InvalidTokenError(f"token check failed ({type(exc).__name__})") from exc


def _verified_user(token: str):
    import jwt
    from monailabel.endpoints.user.auth import DEFAULT_USER, User

    s = _settings()
    if not s.MONAI_LABEL_AUTH_ENABLE:
        return DEFAULT_USER
    if not token:
        raise jwt.InvalidTokenError("no token")
    header = jwt.get_unverified_header(token)
    alg = header.get("alg")
    if alg not in ASYMMETRIC_ALGORITHMS:
        raise jwt.InvalidAlgorithmError(f"token algorithm {alg!r} is not allowed")
    key = signing_key(token, s.MONAI_LABEL_AUTH_REALM_URI)
    payload = jwt.decode(token, key, algorithms=[alg], issuer=s.MONAI_LABEL_AUTH_REALM_URI.rstrip("/"),
                         options={"verify_signature": True, "verify_aud": False, "verify_exp": True,
                                  "verify_iss": True, "require": ["exp", "iss"]})
    aud = payload.get("aud")
    audiences = [aud] if isinstance(aud, str) else list(aud) if isinstance(aud, (list, tuple)) else []
    client = s.MONAI_LABEL_AUTH_CLIENT_ID
    if client not in audiences and payload.get("azp") != client:  # Keycloak: azp names the client
        raise jwt.InvalidAudienceError(f"token is for neither audience nor party {client!r}")
    return User(username=payload.get(s.MONAI_LABEL_AUTH_TOKEN_USERNAME) or "",
                email=payload.get(s.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                name=payload.get(s.MONAI_LABEL_AUTH_TOKEN_NAME),
                roles=_roles(payload, s.MONAI_LABEL_AUTH_TOKEN_ROLES))


# ---------------------------------------------------------------- 2. login
def login_router() -> APIRouter:
    r = APIRouter()

    @r.post("/auth/token", summary="Log in with user name and password (401 when they are wrong)")
    def access_token(form_data: OAuth2PasswordRequestForm = Depends()):
        import requests
        from monailabel.endpoints.user.auth import token_uri

        s = _settings()
        if not s.MONAI_LABEL_AUTH_ENABLE:
            return {"access_token": None, "token_type": None}
        data = {"client_id": s.MONAI_LABEL_AUTH_CLIENT_ID, "username": form_data.username,
                "password": form_data.password, "grant_type": "password"}
        try:
            resp = requests.post(token_uri(), data=data, timeout=s.MONAI_LABEL_AUTH_TIMEOUT,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        except requests.RequestException as exc:
            raise HTTPException(502, detail="the auth server cannot be reached") from exc
        if resp.status_code in (400, 401, 403):
            raise HTTPException(401, detail="invalid user name or password",
                                headers={"WWW-Authenticate": "Bearer"})
        if resp.status_code != 200:
            raise HTTPException(502, detail=f"the auth server answered {resp.status_code}")
        return resp.json()

    return r


# ---------------------------------------------------------------- 3. OHIF
TOKEN_JS = r"""
(function () {
  var KEY = 'ssl_medsam2_token', LOGIN = '/ohif/ssl_medsam2_login.html';
  var origin = window.location.origin;
  function token() { return window.sessionStorage.getItem(KEY); }
  function same(url) { try { return new URL(url, window.location.href).origin === origin; } catch (e) { return false; } }
  function toLogin() {
    window.sessionStorage.removeItem(KEY);
    window.location.replace(LOGIN + '?next=' + encodeURIComponent(window.location.pathname + window.location.search));
  }
  var st = new XMLHttpRequest();  // synchronous on purpose: decide before OHIF starts
  st.open('GET', '/auth/', false);
  st.send();
  var enabled = false;
  try { enabled = st.status === 200 && JSON.parse(st.responseText).enabled === true; } catch (e) {}
  if (!enabled) return;
  if (!token()) { window.stop(); toLogin(); return; }
  var open = XMLHttpRequest.prototype.open, send = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function (method, url) { this.__sslUrl = url; return open.apply(this, arguments); };
  XMLHttpRequest.prototype.send = function () {
    var xhr = this;
    if (same(xhr.__sslUrl)) {
      try { xhr.setRequestHeader('Authorization', 'Bearer ' + token()); } catch (e) {}
      xhr.addEventListener('load', function () { if (xhr.status === 401) toLogin(); });
    }
    return send.apply(this, arguments);
  };
  var fetch0 = window.fetch;
  window.fetch = function (input, init) {
    var url = typeof input === 'string' ? input : (input && input.url) || String(input);
    if (!same(url)) return fetch0.call(this, input, init);
    init = Object.assign({}, init || {});
    var headers = new Headers(init.headers || (input instanceof Request ? input.headers : undefined));
    if (!headers.has('Authorization')) headers.set('Authorization', 'Bearer ' + token());
    init.headers = headers;
    return fetch0.call(this, input, init).then(function (r) { if (r.status === 401) toLogin(); return r; });
  };
})();
"""

LOGIN_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>SSL-MedSAM2 - log in</title>
<style>body{font-family:sans-serif;background:#111;color:#eee;display:flex;justify-content:center;margin-top:12vh}
form{display:flex;flex-direction:column;gap:.6em;width:18em}input,button{font-size:1em;padding:.4em}
#ssl-medsam2-login-error{color:#f88;min-height:1.2em}</style></head>
<body><form id="ssl-medsam2-login">
<h2>SSL-MedSAM2</h2>
<input id="ssl-medsam2-login-user" name="username" placeholder="user name" autocomplete="username" required>
<input id="ssl-medsam2-login-password" name="password" type="password" placeholder="password"
       autocomplete="current-password" required>
<button id="ssl-medsam2-login-submit" type="submit">Log in</button>
<div id="ssl-medsam2-login-error"></div></form>
<script>
document.getElementById('ssl-medsam2-login').addEventListener('submit', async function (ev) {
  ev.preventDefault();
  var body = new URLSearchParams({username: document.getElementById('ssl-medsam2-login-user').value,
                                  password: document.getElementById('ssl-medsam2-login-password').value});
  var r = await fetch('/auth/token', {method: 'POST', body: body});
  if (r.status !== 200) {
    document.getElementById('ssl-medsam2-login-error').textContent = r.status === 401 ?
      'Wrong user name or password' : 'Login failed (' + r.status + ')';
    return;
  }
  window.sessionStorage.setItem('ssl_medsam2_token', (await r.json()).access_token);
  var next = new URLSearchParams(window.location.search).get('next') || '/ohif/';
  window.location.replace(next.startsWith('/ohif/') ? next : '/ohif/');
});
</script></body></html>
"""


def ohif_dir() -> Path:
    import monailabel

    return Path(monailabel.__file__).resolve().parent / "endpoints" / "static" / "ohif"


def _serve_ohif(path: str):
    from fastapi.responses import FileResponse, HTMLResponse, Response

    if path == "ssl_medsam2_auth.js":
        return Response(TOKEN_JS, media_type="application/javascript")
    if path == "ssl_medsam2_login.html":
        return HTMLResponse(LOGIN_HTML)
    if path == "ssl_medsam2_tools.js":  # the app's Brush / Eraser / Save label for the MONAI Label mode
        return FileResponse(str(Path(__file__).resolve().parent / "ohif" / "ssl_medsam2_tools.js"),
                            media_type="application/javascript", headers={"Cache-Control": "no-store"})
    root = ohif_dir()
    if any(ord(c) < 32 or ord(c) == 127 for c in path):  # e.g. %00: no file has such a name (was a 500)
        raise HTTPException(status_code=404, detail="Resource NOT Found")
    target = (root / path).resolve() if path else root / "index.html"
    if root not in target.parents and target != root:
        raise HTTPException(status_code=404, detail="Resource NOT Found")
    if not target.is_file():
        target = root / "index.html"  # the viewer's client-side routes (e.g. /ohif/viewer?...)
    if target.name == "index.html" and target.parent == root:
        html = target.read_text()
        html = html.replace("<head>", '<head><script src="/ohif/ssl_medsam2_auth.js"></script>'
                                      '<script src="/ohif/ssl_medsam2_tools.js"></script>', 1)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})
    media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix == ".wasm":
        media = "application/wasm"
    return FileResponse(str(target), media_type=media)


def ohif_router() -> APIRouter:
    r = APIRouter()

    @r.get("/ohif/{path:path}", include_in_schema=False)
    async def ohif(path: str = ""):
        return _serve_ohif(path)

    return r


# ---------------------------------------------------------------- 4. datastore file
def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_datastore_file(path: str | os.PathLike, text: str) -> None:
    """Atomic write (temp in the same folder, fsync, rename), then the same bytes as the last good copy."""
    from ssl_medsam2.io import atomic_write

    path = Path(path)
    for target in (path, path.with_name("." + path.name + LAST_GOOD_SUFFIX)):
        atomic_write(target, lambda tmp: _write_synced(tmp, text))
    try:  # the renames themselves survive a crash only once the folder is synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _datastore_problem(path: Path) -> str | None:
    """Why ``path`` cannot be loaded as a MONAI Label datastore file (None when it can)."""
    from monailabel.datastore.local import LocalDatastoreModel

    try:
        LocalDatastoreModel.model_validate_json(path.read_text())
        return None
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else 'empty'}"


def recover_datastore_file(studies: str | os.PathLike, name: str = "datastore_v2.json") -> str | None:
    """Before MONAI Label reads it: replace a damaged datastore file by its last good copy.

    Returns a message saying what was done (None when the file was fine or absent). The damaged file
    is kept beside it as ``<name>.damaged-<time>``. Without a good copy the server starts from the
    files on disk (MONAI Label rebuilds images and labels; their info fields are lost).
    """
    path = Path(studies) / name
    if not path.exists():
        return None
    problem = _datastore_problem(path)
    if problem is None:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    kept = path.with_name(f"{name}.damaged-{stamp}")
    os.replace(path, kept)
    good = path.with_name("." + name + LAST_GOOD_SUFFIX)
    if good.exists() and _datastore_problem(good) is None:
        write_datastore_file(path, good.read_text())
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(good.stat().st_mtime))
        msg = (f"{name} was damaged ({problem}); restored the last good copy from {when}; "
               f"the damaged file is kept as {kept.name}")
    else:
        msg = (f"{name} was damaged ({problem}) and no good copy exists; started from the image and label "
               f"files on disk (their info fields are lost); the damaged file is kept as {kept.name}")
    logger.warning("DATASTORE RECOVERY: %s", msg)
    return msg


def _update_datastore_file(self, lock=True):
    """Replacement for ``LocalDatastore._update_datastore_file`` (0.8.5 truncates and rewrites in place)."""
    from filelock import FileLock

    def write():  # no _ignore_event_config: a rename sends no "modified" event to skip (that flag would
        # then stay set and drop the next change from another process); the file watcher skips our own
        # write because its mtime is the _config_ts recorded here
        text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
        write_datastore_file(self._datastore_config_path, text)
        self._config_ts = os.stat(self._datastore_config_path).st_mtime

    if lock:
        with FileLock(self._lock_file):
            write()
    else:
        write()


def local_datastore(studies: str, **kwargs):
    """MONAI Label's LocalDatastore whose datastore file is written atomically, with a last good copy."""
    from monailabel.datastore.local import LocalDatastore

    class AtomicLocalDatastore(LocalDatastore):
        _update_datastore_file = _update_datastore_file

        def _on_moved_event(self, event):
            """A rename onto the datastore file (our atomic write, in this or a child process) is its
            modification: 0.8.5 reloads only on "modified", which a rename never sends."""
            self._on_modify_event(type("Moved", (), {"src_path": event.dest_path})())

    ds = AtomicLocalDatastore(studies, **kwargs)
    if getattr(ds, "_handler", None) is not None:  # auto_reload: the file watcher is running
        ds._handler.on_moved = ds._on_moved_event
    return ds


# ---------------------------------------------------------------- 5. DICOMweb
_seg_cache: dict = {}  # id(datastore) -> {image series: (its newest DICOM-SEG series, that SEG's stamp)}


def clear_listing_caches(names=("list_images", "get_labeled_images")) -> None:
    """Forget the cached image list and labelled set of every DICOMweb datastore in this process."""
    from monailabel.datastore.dicom import DICOMWebDatastore

    for name in names:
        fn = getattr(DICOMWebDatastore, name)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
        elif hasattr(fn, "cache"):
            fn.cache.clear()
    if "get_labeled_images" in names:
        _seg_cache.clear()


def _refresh_image_list(self) -> None:
    """Forget the cached series list (MONAI Label keeps it for MONAI_LABEL_DICOMWEB_CACHE_EXPIRY, 2 h):
    a study sent to the PACS after the list was read is found when a request names it."""
    clear_listing_caches(("list_images",))


def seg_series_by_image(ds) -> dict[str, str]:
    """Image SeriesInstanceUID -> the newest DICOM-SEG series referencing it (what 'final' means in a PACS)."""
    return {k: v[0] for k, v in _newest_segs(ds).items()}


def final_label_stamps(self) -> dict[str, str]:
    """Image SeriesInstanceUID -> when its final label (newest DICOM-SEG) was made, as the SEG says (its
    series and content date + time, a sortable text): the order the final labels were saved in, known
    from the PACS's metadata without downloading one (``Workspace.newest_final_labelled``)."""
    return {k: v[1] for k, v in _newest_segs(self).items()}


def _newest_segs(ds) -> dict[str, tuple[str, str]]:
    key = id(ds)
    if key in _seg_cache:
        return _seg_cache[key]
    from pydicom import Dataset

    client = ds._client  # 0.8.5 has no public accessor for the datastore's DICOMweb client
    out: dict[str, tuple[str, str]] = {}
    for item in client.search_for_series(search_filters={"Modality": "SEG"}):
        seg = Dataset.from_json(item)
        meta = Dataset.from_json(client.retrieve_series_metadata(str(seg.StudyInstanceUID),
                                                                 str(seg.SeriesInstanceUID))[0])
        refs = meta.get("ReferencedSeriesSequence")
        if refs:
            ref = str(refs[0].SeriesInstanceUID)
            stamp = f"{meta.get('SeriesDate', '')}{meta.get('SeriesTime', '')}{meta.get('ContentDate', '')}" \
                    f"{meta.get('ContentTime', '')}"
            if ref not in out or stamp >= out[ref][1]:
                out[ref] = (str(seg.SeriesInstanceUID), stamp)
    _seg_cache[key] = out
    return out


def final_label_on_grid(ds, image_id: str, seg_series: str) -> str:
    """The local NIfTI of ``image_id``'s final label, converted from the DICOM-SEG ``seg_series`` onto the
    image's own grid (every slice, the image's affine), kept until another SEG becomes the final one.

    Why: 0.8.5 converts a SEG on its own extent (only the slices it covers), so a label read back from the
    PACS had another grid than its image. '' when the SEG cannot be placed on the image (logged)."""
    import tempfile

    from filelock import FileLock
    from monailabel.datastore.local import LocalDatastore

    from ssl_medsam2.dicom_seg import read_seg, seg_to_nifti
    from ssl_medsam2.io import InputError

    image = ds.get_image_uri(image_id)
    label_dir = os.path.realpath(os.path.join(ds._datastore.label_path("final"), seg_series))
    # one caller at a time per SEG (other processes too): the server's organ-looks learner reads the final
    # labels while a client asks for one, and a label half-copied into place must never be read
    with FileLock(f"{label_dir}.lock"):
        local = LocalDatastore.get_label_uri(ds, image_id, "final")
        if local and os.path.exists(local) and \
                (LocalDatastore.get_label_info(ds, image_id, "final") or {}).get("SeriesInstanceUID") == seg_series:
            return local
        if not os.path.isdir(label_dir) or not os.listdir(label_dir):
            _download_whole_series(ds, seg_series, label_dir)  # as an image series: whole, renamed into place
        files = sorted(Path(label_dir).iterdir())
        with tempfile.TemporaryDirectory(prefix="ssl_medsam2_seg_") as tmp:  # outside the watched label folder
            out = Path(tmp) / f"{seg_series}.nii.gz"
            try:
                seg = read_seg(files[0].read_bytes(), f"SEG {seg_series}")
                mapping = getattr(ds, "ssl_medsam2_segment_ids", None)
                ids = mapping(seg.segments, f"SEG {seg_series}") if mapping else {n: n for n in seg.segments}
                seg_to_nifti(seg, image, out, ids, f"SEG {seg_series}")
                names = {str(ids[n]): label for n, label in seg.segments.items() if label and ids.get(n)}
                LocalDatastore.save_label(ds, image_id, str(out), "final", {**ds._dicom_info(seg_series),
                                                                              "ssl_segment_names": names})
            except (InputError, IndexError) as exc:
                logger.warning("final label of %s: DICOM-SEG %s is not usable: %s", image_id, seg_series, exc)
                return ""
    return LocalDatastore.get_label_uri(ds, image_id, "final")


#: a series downloaded less than this long ago (seconds) is compared with the PACS's instance count on every
#: use (it may still be arriving: instances can come seconds apart); an older one at most every SERIES_RECHECK_S
SERIES_SETTLE_S = 120.0
SERIES_RECHECK_S = 300.0
#: downloads of a series whose instance count changes meanwhile (still arriving) before giving up
SERIES_DOWNLOAD_TRIES = 3
_series_seen: dict[str, tuple[float, float]] = {}  # series -> (downloaded at, last compared), time.monotonic()


def pacs_instance_count(ds, series_id: str) -> int | None:
    """How many instances the PACS holds of ``series_id`` (QIDO ``NumberOfSeriesRelatedInstances``); None
    when it does not say."""
    found = ds._client.search_for_series(search_filters={"SeriesInstanceUID": series_id},
                                         fields=["NumberOfSeriesRelatedInstances"])
    for s in found or ():
        if (s.get("0020000E") or {}).get("Value") == [series_id]:
            value = (s.get("00201209") or {}).get("Value")
            return int(value[0]) if value else None
    return None


def _download_whole_series(ds, series_id: str, image_dir: str) -> None:
    """Download ``series_id`` into ``image_dir`` only once it is whole: into a temp folder, kept (renamed into
    place) when the PACS held as many instances before and after as were downloaded. A series still
    arriving is tried again, then refused with a reason (never cached half)."""
    import shutil

    from monailabel.datastore.utils.dicom import dicom_web_download_series

    from ssl_medsam2.io import InputError

    got = before = after = None
    for attempt in range(SERIES_DOWNLOAD_TRIES):
        tmp = f"{image_dir}.part-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        before = pacs_instance_count(ds, series_id)
        dicom_web_download_series(None, series_id, tmp, ds._client, ds._fetch_by_frame)
        got = len(os.listdir(tmp))
        after = pacs_instance_count(ds, series_id)
        if got and (after is None or before == after == got):
            if os.path.isdir(image_dir):
                shutil.rmtree(image_dir)
            os.replace(tmp, image_dir)
            return
        shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(1.0 + attempt)
    raise InputError(None, f"series {series_id} is still arriving in the PACS ({got} of {after} instances "
                           f"read); ask again in a moment")


def whole_series_image_uri(original):
    """``DICOMWebDatastore.get_image_uri`` that never keeps a series read while it was still arriving (0.8.5
    downloads into the cache folder in place and keeps whatever it found there for good: a study read in
    the seconds it took to arrive stayed one slice long), nor one half-downloaded by a concurrent caller (a
    lock file per series, so other processes wait too). A cached series is compared with the PACS's
    instance count on every use for ``SERIES_SETTLE_S`` after its download, then every
    ``SERIES_RECHECK_S``; when they differ it is read again (and results made from the old copy are no
    longer current: their digest names the image file's content)."""
    import shutil

    from filelock import FileLock

    @functools.wraps(original)
    def get_image_uri(self, image_id: str) -> str:
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        with FileLock(f"{image_dir}.lock"):
            have = len(os.listdir(image_dir)) if os.path.isdir(image_dir) else 0
            now = time.monotonic()
            downloaded, compared = _series_seen.get(image_id, (-SERIES_SETTLE_S, -SERIES_RECHECK_S))
            if have and (now - downloaded < SERIES_SETTLE_S or now - compared >= SERIES_RECHECK_S):
                count = pacs_instance_count(self, image_id)
                _series_seen[image_id] = (downloaded, now)
                if count is not None and count != have:
                    logger.warning("series %s: %d instances cached, the PACS holds %d: reading it again",
                                   image_id, have, count)
                    shutil.rmtree(image_dir)
                    Path(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz")).unlink(missing_ok=True)
                    have = 0
            if not have:
                _download_whole_series(self, image_id, image_dir)
                _series_seen[image_id] = (time.monotonic(), time.monotonic())
            return original(self, image_id)

    get_image_uri._ssl_medsam2_whole = True
    return get_image_uri


def _install_dicomweb() -> None:
    from ssl_medsam2.dicom_seg import dcmqi_bin_dir

    bin_dir = dcmqi_bin_dir()
    if bin_dir is not None and str(bin_dir) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = str(bin_dir) + os.pathsep + os.environ.get("PATH", "")
    from monailabel.datastore.dicom import DICOMWebDatastore
    from monailabel.datastore.utils import convert

    def fresh_after(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            finally:
                clear_listing_caches()

        wrapper._ssl_medsam2_fresh = True
        return wrapper

    if not getattr(convert.dicom_seg_to_itk_image, "_ssl_medsam2_nifti", False):
        seg_to_image = convert.dicom_seg_to_itk_image

        @functools.wraps(seg_to_image)
        def dicom_seg_to_nifti(label, output_ext=".nii.gz"):
            return seg_to_image(label, output_ext=output_ext)

        dicom_seg_to_nifti._ssl_medsam2_nifti = True
        convert.dicom_seg_to_itk_image = dicom_seg_to_nifti

    original_get_label_uri = DICOMWebDatastore.get_label_uri
    if not getattr(original_get_label_uri, "_ssl_medsam2_by_image", False):
        @functools.wraps(original_get_label_uri)
        def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
            if label_tag == "final" and not image_id and label_id in set(self.list_images()):
                seg = seg_series_by_image(self).get(label_id)
                return final_label_on_grid(self, label_id, seg) if seg else ""
            if label_tag == "final" and image_id:
                return final_label_on_grid(self, image_id, label_id)
            return original_get_label_uri(self, label_id, label_tag, image_id)

        get_label_uri._ssl_medsam2_by_image = True
        DICOMWebDatastore.get_label_uri = get_label_uri

    original_dicom_info = DICOMWebDatastore._dicom_info
    if not getattr(original_dicom_info, "_ssl_medsam2_no_address", False):
        @functools.wraps(original_dicom_info)
        def dicom_info(self, series_id):
            """Image / label info without the PACS's RetrieveURL (its internal address)."""
            return {k: v for k, v in original_dicom_info(self, series_id).items() if k != "RetrieveURL"}

        dicom_info._ssl_medsam2_no_address = True
        DICOMWebDatastore._dicom_info = dicom_info

    if not getattr(DICOMWebDatastore.get_image_uri, "_ssl_medsam2_whole", False):
        DICOMWebDatastore.get_image_uri = whole_series_image_uri(DICOMWebDatastore.get_image_uri)
    DICOMWebDatastore._update_datastore_file = _update_datastore_file  # its local cache index, same fix (4)
    DICOMWebDatastore.refresh_image_list = _refresh_image_list
    DICOMWebDatastore.final_label_stamps = final_label_stamps
    for name in ("save_label", "add_image", "remove_image", "remove_label"):
        method = getattr(DICOMWebDatastore, name, None)
        if method is not None and not getattr(method, "_ssl_medsam2_fresh", False):
            setattr(DICOMWebDatastore, name, fresh_after(method))
    logger.info("ssl_medsam2 dicomweb: dcmqi %s; listing caches cleared after saves", bin_dir or "NOT found")


# ---------------------------------------------------------------- 6. routes in front
def install_in_front(fastapi_app, router, tag: str = "SSL-MedSAM2") -> int:
    """Put ``router``'s routes ahead of MONAI Label's own (same paths: the first match wins)."""
    from fastapi.routing import APIRoute

    prefix = _settings().MONAI_LABEL_API_STR or ""
    new = []
    for route in router.routes:
        if isinstance(route, APIRoute):
            fastapi_app.add_api_route(prefix + route.path, route.endpoint, methods=list(route.methods),
                                      summary=route.summary, tags=[tag], include_in_schema=route.include_in_schema)
            new.append(fastapi_app.router.routes.pop())
    fastapi_app.router.routes[0:0] = new
    fastapi_app.openapi_schema = None
    return len(new)


def install_server_routes(fastapi_app, app_router) -> None:
    """In the server process: login, OHIF and the app's guarded routes in front of MONAI Label's; once."""
    if getattr(fastapi_app.state, "ssl_medsam2_routes", False):
        return
    n = install_in_front(fastapi_app, app_router)
    n += install_in_front(fastapi_app, ohif_router())
    n += install_in_front(fastapi_app, login_router())
    fastapi_app.state.ssl_medsam2_routes = True
    logger.info("ssl_medsam2: %d routes installed in front of MONAI Label %s's", n, PATCHED_VERSION)


# ---------------------------------------------------------------- 7. rescoring switch
def set_auto_update_scoring(app, on: bool) -> None:
    """``app.auto_update_scoring`` instead of the process-wide ``MONAI_LABEL_AUTO_UPDATE_SCORING``:
    0.8.5 reads the setting once into the private ``_auto_update_scoring`` and offers no hook."""
    app._auto_update_scoring = on


# ---------------------------------------------------------------- installation
def install() -> None:
    """Process-wide fixes (token check, DICOMweb), once per process, after the version check."""
    global _installed
    with _lock:
        if _installed:
            return
        check_version()
        import monailabel.endpoints.user.auth as ml_auth

        ml_auth.from_token = from_token
        _install_dicomweb()
        _installed = True
        logger.info("ssl_medsam2: MONAI Label %s fixes installed (auth %s)", PATCHED_VERSION,
                    "ON" if _settings().MONAI_LABEL_AUTH_ENABLE else "off")

