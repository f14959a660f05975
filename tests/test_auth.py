"""MONAI Label Keycloak RBAC works with PyJWT 2 through apps/ssl_medsam2/monailabel_085.py.

A local token issuer (Keycloak-shaped realm document, OpenID configuration, JWKS and a password-grant
token endpoint) runs in a thread with a freshly generated RSA key; the real app runs in a MONAI Label
server with ``MONAI_LABEL_AUTH_ENABLE=true`` against it. Roles are MONAI Label's own (user < annotator < admin per
endpoint): anonymous is refused, a user can read, an annotator can save labels but cannot train,
an admin can. OHIF's static files load without a token.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import NO_QUEUE, REPO, downsample_case, load_script

APP_FIXES = REPO / "apps" / "ssl_medsam2" / "monailabel_085.py"
ROLES = {"admin": ["monailabel-admin", "monailabel-reviewer", "monailabel-annotator", "monailabel-user"],
         "annotator": ["monailabel-annotator", "monailabel-user"],
         "viewer": ["monailabel-user"],
         "nobody": []}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Issuer:
    """A Keycloak-shaped token issuer on 127.0.0.1 (one realm, RSA key, password grant)."""

    def __init__(self, with_public_key: bool = True):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "test-key-1"
        self.with_public_key = with_public_key
        self.port = _free_port()
        self.realm = f"http://127.0.0.1:{self.port}/realms/monailabel"
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = urllib.parse.urlparse(self.path).path
                if path == "/realms/monailabel":
                    doc = {"realm": "monailabel", "token-service": f"{issuer.realm}/protocol/openid-connect"}
                    if issuer.with_public_key:
                        doc["public_key"] = issuer.public_b64()
                    self._json(doc)
                elif path == "/realms/monailabel/.well-known/openid-configuration":
                    self._json({"issuer": issuer.realm,
                                "token_endpoint": f"{issuer.realm}/protocol/openid-connect/token",
                                "jwks_uri": f"{issuer.realm}/protocol/openid-connect/certs"})
                elif path == "/realms/monailabel/protocol/openid-connect/certs":
                    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer.key.public_key()))
                    self._json({"keys": [{**jwk, "kid": issuer.kid, "use": "sig", "alg": "RS256"}]})
                else:
                    self._json({"error": "not found"}, 404)

            def do_POST(self):
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                user = form.get("username", [""])[0]
                if (urllib.parse.urlparse(self.path).path.endswith("/token") and form.get("grant_type") == ["password"]
                        and user in ROLES and form.get("password") == [f"{user}-pw"]):
                    self._json({"access_token": issuer.token(user), "token_type": "Bearer", "expires_in": 300})
                else:
                    self._json({"error": "invalid_grant"}, 401)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def public_b64(self) -> str:
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode()

    def token(self, user: str, *, exp_in: float = 300, key=None, alg: str = "RS256", roles=None) -> str:
        now = int(time.time())
        claims = {"iss": self.realm, "sub": f"id-{user}", "preferred_username": user, "email": f"{user}@example.org",
                  "name": user.title(), "iat": now, "exp": now + int(exp_in), "azp": "monailabel-app",
                  "realm_access": {"roles": ROLES.get(user, []) if roles is None else roles}}
        return jwt.encode(claims, key if key is not None else self.key, algorithm=alg, headers={"kid": self.kid})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _load_auth_module():
    """The app's fix module, imported without installing anything in this process."""
    spec = importlib.util.spec_from_file_location("ssl_medsam2_monailabel_085", APP_FIXES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_jwks_only_issuer_and_algorithm_pinning(monkeypatch):
    """Without Keycloak's public_key the key comes from JWKS by kid; HS256/none tokens never pass."""
    from monailabel.config import settings

    auth = _load_auth_module()
    issuer = Issuer(with_public_key=False)
    try:
        monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
        monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", issuer.realm)
        user = auth.from_token(issuer.token("annotator"))
        assert user.username == "annotator" and "monailabel-annotator" in user.roles
        assert "monailabel-admin" not in user.roles
        pem = issuer.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        # algorithm-confusion forgery (HS256 keyed with the public key) and unsigned tokens
        header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        body = base64.urlsafe_b64encode(json.dumps({"preferred_username": "x", "exp": int(time.time()) + 60}).encode()
                                        ).rstrip(b"=").decode()
        for bad in (f"{header}.{body}.", issuer.token("admin", exp_in=-10),
                    issuer.token("admin", key=rsa.generate_private_key(public_exponent=65537, key_size=2048))):
            with pytest.raises(jwt.InvalidTokenError):
                auth.from_token(bad)
        import hmac, hashlib
        h = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
        sig = base64.urlsafe_b64encode(hmac.new(pem, f"{h}.{body}".encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
        with pytest.raises(jwt.InvalidTokenError):
            auth.from_token(f"{h}.{body}.{sig}")
    finally:
        issuer.close()


def _pacs_demo():
    return load_script("pacs_demo")


@pytest.fixture(scope="module")
def server(tmp_path_factory, chaos_dir):
    """The real app (apps/ssl_medsam2, whose main.py installs monailabel_085.py) with Keycloak auth on."""
    root = tmp_path_factory.mktemp("auth")
    studies = root / "studies"
    downsample_case(chaos_dir / "imagesTr" / "chaos_01_0000.nii.gz", chaos_dir / "labelsTr" / "chaos_01.nii.gz",
                    studies / "chaos_01.nii.gz", root / "label_chaos_01.nii.gz", factor=8)
    issuer = Issuer()
    srv = None
    try:
        srv = _pacs_demo().start_monailabel(
            str(studies), root / "work", conf={"app.retrain_after_labels": 0, **NO_QUEUE},
            env={"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": issuer.realm})
        yield {"url": srv.url, "issuer": issuer, "label": root / "label_chaos_01.nii.gz", "log": srv.log_path}
    finally:
        if srv is not None:
            srv.stop()
        issuer.close()


def _h(token):
    return {"Authorization": f"Bearer {token}"} if token else {}


def _save_label(server, token):
    with open(server["label"], "rb") as fh:
        return httpx.put(f"{server['url']}/datastore/label", params={"image": "chaos_01", "tag": "final"},
                         files={"label": ("label.nii.gz", fh)}, data={"params": "{}"}, headers=_h(token), timeout=60)


def test_anonymous_and_bad_tokens_are_refused(server):
    url, issuer = server["url"], server["issuer"]
    assert httpx.get(f"{url}/info/").status_code == 401
    assert httpx.get(f"{url}/datastore/").status_code == 401
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for bad in ("garbage", issuer.token("admin", exp_in=-30), issuer.token("admin", key=other)):
        assert httpx.get(f"{url}/info/", headers=_h(bad)).status_code == 401, bad


def test_roles_as_monai_label_defines_them(server):
    url, issuer = server["url"], server["issuer"]
    viewer, annotator, admin = issuer.token("viewer"), issuer.token("annotator"), issuer.token("admin")
    # any monailabel role may read; a token without one is authenticated but forbidden
    assert httpx.get(f"{url}/info/", headers=_h(viewer)).status_code == 200
    assert httpx.get(f"{url}/info/", headers=_h(issuer.token("nobody"))).status_code == 403
    assert httpx.get(f"{url}/auth/token/valid", headers=_h(annotator)).json()["username"] == "annotator"
    # saving a label needs the annotator role
    assert _save_label(server, viewer).status_code == 403
    r = _save_label(server, annotator)
    assert r.status_code == 200, r.text
    assert r.json().get("user") == "annotator", "the saved label records the authenticated user"
    ds = httpx.get(f"{url}/datastore/", params={"output": "all"}, headers=_h(viewer)).json()
    assert "final" in json.dumps(ds["objects"]["chaos_01"]["labels"])
    # training and logs need the admin role
    assert httpx.post(f"{url}/train/", json={}, headers=_h(annotator)).status_code == 403
    assert httpx.get(f"{url}/logs/", headers=_h(annotator)).status_code == 403
    assert httpx.get(f"{url}/logs/", headers=_h(admin)).status_code == 200
    assert httpx.post(f"{url}/train/ssl_nnunet", json={}, headers=_h(annotator)).status_code == 403
    # the admin passes the role check (an unknown trainer then gets the app's 404, nothing is started)
    assert httpx.post(f"{url}/train/no_such_trainer", json={}, headers=_h(admin)).status_code == 404


def test_password_login_through_the_server(server):
    """What the Slicer module and the REST API do: POST /auth/token with a user name and password."""
    url = server["url"]
    r = httpx.post(f"{url}/auth/token", data={"username": "annotator", "password": "annotator-pw"})
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert httpx.get(f"{url}/info/", headers=_h(token)).status_code == 200
    r = httpx.post(f"{url}/auth/token", data={"username": "annotator", "password": "wrong"})
    assert r.status_code == 401 and "invalid" in r.json()["detail"], r.text


def test_ohif_static_files_load_without_a_token(server):
    url = server["url"]
    r = httpx.get(f"{url}/ohif/")
    assert r.status_code == 200 and "<html" in r.text.lower()
    r = httpx.get(f"{url}/ohif/app-config.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"] and "<html" not in r.text[:200].lower()
    import monailabel

    sub = next(p for p in sorted((Path(monailabel.__file__).parent / "endpoints/static/ohif/assets").iterdir())
               if p.is_file())
    r = httpx.get(f"{url}/ohif/assets/{sub.name}")  # upstream returns index.html for files in subfolders
    assert r.status_code == 200 and r.content == sub.read_bytes()
    leak = httpx.get(f"{url}/ohif/..%2F..%2F..%2Fconfig.py")  # no way out of the OHIF folder
    assert leak.status_code == 404 and "MONAI_LABEL" not in leak.text
    # the API behind it still needs a token
    assert httpx.get(f"{url}/info/").status_code == 401
