"""Keycloak auth for MONAI Label 0.8.5 that works with PyJWT 2, installed from the app (no site-packages edits).

Why: MONAI Label's token check calls ``jwt.decode(token, key, options=...)`` without ``algorithms=``;
PyJWT 2 rejects that, so with ``MONAI_LABEL_AUTH_ENABLE=true`` every valid token fails (401) and
nobody can work. We replace ``monailabel.endpoints.user.auth.from_token`` (looked up at call time by
``get_current_user``, which every ``RBAC(...)`` dependency uses) with a check that

- pins the algorithm to asymmetric ones (RS/PS/ES/EdDSA) so a token signed with HS256 using the
  public key as the secret, or ``alg: none``, is refused;
- takes the key from the Keycloak realm document (``public_key``), or from the issuer's JWKS
  (``jwks_uri`` of ``.well-known/openid-configuration``, matched by ``kid``) for other OIDC issuers;
- keeps MONAI Label's semantics otherwise: signature and expiry verified, audience not, the user's
  roles read from ``MONAI_LABEL_AUTH_TOKEN_ROLES`` (``realm_access#roles``); roles are enforced by
  MONAI Label's own ``RBAC`` per endpoint (e.g. saving a label needs the annotator role, training
  the admin role).

It also serves the bundled OHIF viewer's static files at ``/ohif/`` without a token (a browser
cannot attach a bearer token to ``<script>`` loads, so with auth on OHIF could not even load), and
fixes upstream's ``/ohif/<dir>/<file>`` lookup (it joins with ``os.pathsep`` and returns index.html).

Hook: ``import auth`` at the top of the app's ``main.py`` (MONAI Label puts the app folder on
``sys.path`` while it loads ``main.py``); importing installs the fix once per process.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import sys
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_installed = False
_lock = threading.Lock()
_jwk_clients: dict[str, object] = {}


def _settings():
    from monailabel.config import settings

    return settings


def _realm_document(realm_uri: str) -> dict:
    import requests

    r = requests.get(realm_uri, timeout=_settings().MONAI_LABEL_AUTH_TIMEOUT)
    r.raise_for_status()
    return r.json()


_realm_cache: dict[str, dict] = {}


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
    """Drop-in for ``monailabel.endpoints.user.auth.from_token`` that names its algorithms."""
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
    payload = jwt.decode(token, key, algorithms=[alg],
                         options={"verify_signature": True, "verify_aud": False, "verify_exp": True,
                                  "require": ["exp"]})
    return User(username=payload.get(s.MONAI_LABEL_AUTH_TOKEN_USERNAME) or "",
                email=payload.get(s.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                name=payload.get(s.MONAI_LABEL_AUTH_TOKEN_NAME),
                roles=_roles(payload, s.MONAI_LABEL_AUTH_TOKEN_ROLES))


def ohif_dir() -> Path:
    import monailabel

    return Path(monailabel.__file__).resolve().parent / "endpoints" / "static" / "ohif"


def _serve_ohif(path: str):
    from fastapi import HTTPException
    from fastapi.responses import FileResponse

    root = ohif_dir()
    target = (root / path).resolve() if path else root / "index.html"
    if root not in target.parents and target != root:
        raise HTTPException(status_code=404, detail="Resource NOT Found")
    if not target.is_file():
        target = root / "index.html"  # the viewer's client-side routes (e.g. /ohif/viewer?...)
    media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix == ".wasm":
        media = "application/wasm"
    return FileResponse(str(target), media_type=media)


def install_ohif_route(app) -> bool:
    """Put a token-free, path-correct ``/ohif/`` route ahead of MONAI Label's own."""
    from fastapi.routing import APIRoute

    if any(getattr(r, "name", "") == "ssl_medsam2_ohif" for r in app.router.routes):
        return False

    async def ohif(path: str = ""):
        return _serve_ohif(path)

    route = APIRoute("/ohif/{path:path}", ohif, methods=["GET"], name="ssl_medsam2_ohif", include_in_schema=False)
    app.router.routes.insert(0, route)
    return True


def install() -> None:
    """Patch the token check (every process) and the OHIF route (the server process) once."""
    global _installed
    with _lock:
        if _installed:
            return
        import monailabel.endpoints.user.auth as ml_auth

        ml_auth.from_token = from_token
        server = sys.modules.get("monailabel.app")
        if server is not None and hasattr(server, "app"):
            install_ohif_route(server.app)
        _installed = True
        logger.info("ssl_medsam2 auth: PyJWT 2 token check installed (auth %s)",
                    "ON" if _settings().MONAI_LABEL_AUTH_ENABLE else "off")


if os.environ.get("SSL_MEDSAM2_NO_AUTH_PATCH", "").lower() not in ("1", "true", "yes"):
    install()
