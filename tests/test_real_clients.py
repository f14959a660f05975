"""The real clients' flow: ``monailabel.client.MONAILabelClient`` (the client 3D Slicer's module ships)
against the real app on 127.0.0.1, auth off (the default) and on (a local Keycloak-shaped issuer).

Real CHAOS MRI (8 cases, 32x32 in-plane, 10 slices; two with final labels). The Slicer flow: info ->
next sample (with skips) -> infer on the leased image -> save draft, then final -> upload a volume ->
sessions -> train start / status / stop. What must hold for annotators working side by side: one
client skips 8 samples without a refusal and holds one lease; a second client never gets the first's
open sample; a viewer is shown samples but holds none; without a token, the 5th distinct client
holding a lease is refused with a reason that says how to get in.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from conftest import NO_QUEUE, chaos_cases, downsample_case, fewshot_model, load_script
from test_auth import Issuer

LABELLED = ["chaos_01", "chaos_02"]
TRAIN = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "quality_gate": "off"}


def _build(chaos_dir: Path, root: Path) -> Path:
    studies = root / "studies"
    for case in chaos_cases():
        img = chaos_dir / "imagesTr" / f"{case}_0000.nii.gz"
        z = nib.load(str(img)).shape[2]
        dst = (studies / "labels" / "final" if case in LABELLED else root / "truth") / f"{case}.nii.gz"
        downsample_case(img, chaos_dir / "labelsTr" / f"{case}.nii.gz", studies / f"{case}.nii.gz", dst,
                        factor=8, z_range=((z - 10) // 2, (z - 10) // 2 + 10))
    downsample_case(chaos_dir / "imagesTr" / "chaos_03_0000.nii.gz", None, root / "upload" / "new_scan.nii.gz",
                    None, factor=8, z_range=(0, 10))
    return studies


def _start(chaos_dir, root: Path, env: dict | None = None):
    studies = _build(chaos_dir, root)
    conf = {"app.retrain_after_labels": 0, "app.anonymous_leases": 4, "input.classes": "[1]", **NO_QUEUE}
    return studies, load_script("pacs_demo").start_monailabel(str(studies), root / "work", conf=conf, env=env)


@pytest.fixture(scope="module")
def open_server(chaos_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("clients_open")
    studies, server = _start(chaos_dir, root)
    try:
        yield {"url": server.url, "root": root, "studies": studies}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def auth_server(chaos_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("clients_auth")
    issuer = Issuer()
    server = None
    try:
        studies, server = _start(chaos_dir, root, env={"MONAI_LABEL_AUTH_ENABLE": "true",
                                                       "MONAI_LABEL_AUTH_REALM_URI": issuer.realm})
        yield {"url": server.url, "root": root, "studies": studies, "issuer": issuer}
    finally:
        if server is not None:
            server.stop()
        issuer.close()


def _client(url: str, tmp: Path, client_id: str | None = None, login: tuple[str, str] | None = None):
    from monailabel.client import MONAILabelClient

    class SlicerClient(MONAILabelClient):
        """Slicer's module builds a new client for every call; one long-lived ``MONAILabelClient`` with a
        token would send a stale content-type/length on later calls (its multipart helper updates the
        shared header dict in place), so each call here gets fresh headers, as in Slicer."""

        @property
        def _headers(self):
            return dict(self.__dict__.setdefault("_auth", {}))

        @_headers.setter
        def _headers(self, value):
            self.__dict__["_auth"] = dict(value)

        def update_auth(self, token):
            if token:
                self.__dict__.setdefault("_auth", {})["Authorization"] = f"{token['token_type']} {token['access_token']}"

    c = SlicerClient(url, tmpdir=str(tmp), client_id=client_id)
    if login:
        c.update_auth(c.auth_token(*login))  # Slicer's login: POST /auth/token, then a Bearer header
    return c


def _status(exc) -> int:
    return int(getattr(exc, "status_code", None) or str(exc).split("Status: ")[1].split(";")[0])


def _leases(url: str, headers: dict | None = None) -> dict:
    return httpx.get(f"{url}/ssl_medsam2/leases", headers=headers or {}, timeout=30).json()


def _slicer_flow(url: str, studies: Path, root: Path, tmp: Path, first, second, trainer, holder_of):
    """The Slicer module's sequence through ``MONAILabelClient``; returns what it measured."""
    from monailabel.client.client import MONAILabelClientException

    info = first.info()
    model = fewshot_model(info)
    assert "ssl_nnunet" in info["trainers"] and "random" in info["strategies"]
    # next sample, skipped 8 times: never refused, never the same image twice in a row, one lease held
    seen = [first.next_sample("random", {})["id"] for _ in range(9)]
    assert all(a != b for a, b in zip(seen, seen[1:])), seen
    held = {k for k, v in _leases(url, holder_of["headers"]).items() if v["holder"] == holder_of["first"]}
    assert held == {seen[-1]}, (held, seen)
    # a second annotator, asking again and again, never gets the first one's open sample
    others = [second.next_sample("random", {}).get("id") for _ in range(6)]
    assert seen[-1] not in others and all(others), others
    image = seen[-1]
    # infer on the leased image: the label comes back on the image grid
    label_file, params = first.infer(model, image, {})
    lab, img = nib.load(label_file), nib.load(str(studies / f"{image}.nii.gz"))
    assert lab.shape == img.shape and np.allclose(lab.affine, img.affine, atol=1e-3), params
    # a draft ends the saver's own lease (their work is saved); the final label counts as labelled
    r = first.save_label(image, label_file, tag="draft")
    assert r["tag"] == "draft" and r["lease_released"] is True and r["user"] == holder_of["first"], r
    r = first.save_label(image, label_file, tag="final")
    assert r["tag"] == "final" and r["user"] == holder_of["first"], r
    assert image not in _leases(url, holder_of["headers"])
    assert image in first.datastore()["objects"] and "final" in first.datastore()["objects"][image]["labels"]
    # upload a volume (Slicer's PUT /datastore/?image=ID)
    up = first.upload_image(str(root / "upload" / "new_scan.nii.gz"), image_id="new_scan")
    assert up["image"] == "new_scan", up
    # sessions: create from a file, read it back (no server path in it), infer on it, remove it
    s = first.create_session(str(root / "upload" / "new_scan.nii.gz"))
    sid = s["session_id"]
    got = first.get_session(sid)
    assert got["image"] == "new_scan.nii.gz" and "path" not in got and str(root) not in str(got), got
    label_file, _ = first.infer(model, "", {}, session_id=sid)
    assert nib.load(label_file).shape == nib.load(str(root / "upload" / "new_scan.nii.gz")).shape
    first.remove_session(sid)
    with pytest.raises(MONAILabelClientException) as err:
        first.get_session(sid)
    assert _status(err.value) == 404
    # train: start a tiny run, see its status, stop it
    started = trainer.train_start("ssl_nnunet", dict(TRAIN))
    assert started, started
    status = trainer.train_status()
    assert status, status
    trainer.train_stop()
    deadline = time.time() + 120
    while trainer.train_status(check_if_running=True) and time.time() < deadline:
        time.sleep(1)
    assert not trainer.train_status(check_if_running=True), "the run did not stop"
    return {"skips": seen, "others": others}


def test_slicer_flow_auth_off(open_server, tmp_path):
    url = open_server["url"]
    first, second = _client(url, tmp_path, "slicer-1"), _client(url, tmp_path, "slicer-2")
    _slicer_flow(url, open_server["studies"], open_server["root"], tmp_path, first, second, first,
                 {"first": "slicer-1", "headers": {}})
    # a client that sends no client_id (MONAILabelClient's default) is one holder too: its skips move its lease
    anon = _client(url, tmp_path)
    ids = [anon.next_sample("random", {})["id"] for _ in range(4)]
    mine = [k for k, v in _leases(url).items() if v["holder"].startswith("anonymous@")]
    assert mine == [ids[-1]], (mine, ids)


def test_the_fifth_anonymous_holder_is_refused_with_a_reason(open_server, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    url = open_server["url"]
    holders = {v["holder"] for v in _leases(url).values()}
    need = 4 - len(holders)
    for i in range(need):
        assert _client(url, tmp_path, f"reader-{i}").next_sample("random", {})["id"]
    assert len({v["holder"] for v in _leases(url).values()}) == 4
    with pytest.raises(MONAILabelClientException) as err:
        _client(url, tmp_path, "reader-late").next_sample("random", {})
    assert _status(err.value) == 429
    text = str(err.value)
    assert "client_id" in text and "log in" in text and "app.anonymous_leases" in text, text
    # those who already hold one still skip freely
    for h in sorted(holders)[:1]:
        if not h.startswith("anonymous@"):
            assert _client(url, tmp_path, h).next_sample("random", {})["id"]


def test_slicer_flow_auth_on(auth_server, tmp_path):
    url, issuer = auth_server["url"], auth_server["issuer"]
    first = _client(url, tmp_path, "spoofed-name", login=("annotator", "annotator-pw"))
    second = _client(url, tmp_path, "annotator")  # bob claims the annotator's name; the token decides
    second.update_auth({"token_type": "Bearer", "access_token": issuer.token("bob", roles=["monailabel-annotator",
                                                                                         "monailabel-user"])})
    admin = _client(url, tmp_path, login=("admin", "admin-pw"))
    headers = {"Authorization": f"Bearer {issuer.token('admin')}"}
    _slicer_flow(url, auth_server["studies"], auth_server["root"], tmp_path, first, second, admin,
                 {"first": "annotator", "headers": headers})
    assert {v["holder"] for v in _leases(url, headers).values()} == {"bob"}
    # a viewer is shown a free sample but holds no lease
    viewer = _client(url, tmp_path, login=("viewer", "viewer-pw"))
    before = _leases(url, headers)
    s = viewer.next_sample("random", {})
    assert s["id"] and s["lease"] is None and s["id"] not in before
    assert _leases(url, headers) == before


def test_tokens_for_another_issuer_or_client_are_refused(auth_server):
    """Signed by the realm's key, but issued for another realm or another client: 401, not a user."""
    import jwt

    url, issuer = auth_server["url"], auth_server["issuer"]
    now = int(time.time())
    base = {"preferred_username": "mallory", "exp": now + 300, "iat": now, "iss": issuer.realm,
            "azp": "monailabel-app", "realm_access": {"roles": ["monailabel-admin", "monailabel-user"]}}
    ok = jwt.encode(base, issuer.key, algorithm="RS256", headers={"kid": issuer.kid})
    assert httpx.get(f"{url}/info/", headers={"Authorization": f"Bearer {ok}"}).status_code == 200
    for bad in ({"iss": "http://127.0.0.1:1/realms/other"}, {"azp": "another-app"},
                {"azp": "another-app", "aud": ["account"]}):
        claims = {**base, **bad}
        tok = jwt.encode(claims, issuer.key, algorithm="RS256", headers={"kid": issuer.kid})
        r = httpx.get(f"{url}/info/", headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 401, (bad, r.status_code, r.text)
    # an ES256 token from an attacker's key: refused as 401 (was a 500)
    from cryptography.hazmat.primitives.asymmetric import ec

    es = jwt.encode(base, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": issuer.kid})
    assert httpx.get(f"{url}/info/", headers={"Authorization": f"Bearer {es}"}).status_code == 401
