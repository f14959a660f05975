"""The container deployment (deploy/): the server image and the compose stack, built and run with podman.

One stack, in order: build the base (debootstrap) and the images (deploy/ci/build.sh: this machine's
local wheels and its CA bundle as a build secret), `podman-compose up` on 127.0.0.1 with free ports,
CHAOS cases (128x128, 12 slices) sent to Orthanc as DICOM (two with a DICOM-SEG, the supports, before the
app starts; the others while it runs), an atlas pseudo label over HTTP (Dice against the expert label), a final label saved through the app and
found in Orthanc as a DICOM-SEG with the same voxels, a tiny nnU-Net run (a model version), then the
app container killed (`podman kill`) in the middle of a second save, the stack down and up again:
every acknowledged label, the model versions, a readable datastore and /info must be there. The image
runs as a non-root user and no layer holds the machine's extra CA certificates, a private key or a
token (the layers are read one by one from podman's storage). Without podman, podman-compose,
debootstrap or root it skips, saying which. Timings (build, start, restart) are printed as JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO
from ssl_medsam2 import dicom_seg, pacs
from ssl_medsam2.server import site_conf
from test_app_server import NNUNET_TINY, _wait_task
from test_ohif_browser import _dice_with_truth, _read_seg, _seg_referencing, small_cases

DEPLOY = REPO / "deploy"
IMAGE = "localhost/ssl-medsam2:latest"
CASES = ["chaos_01", "chaos_02", "chaos_03", "chaos_05"]
LABELLED = ["chaos_01", "chaos_02"]
SAVED = "chaos_03"  # pseudo label, then saved as final: acknowledged before the kill
KILLED = "chaos_05"  # saved while the app container is killed
#: added to deploy/site.env (the shipped settings are the ones tested)
SITE_ENV = {
    "SSL_MEDSAM2__INPUT__CLASSES": "[1]",
    "SSL_MEDSAM2__PROTOCOL__ENGINE": "atlas",
    "SSL_MEDSAM2__APP__RETRAIN_AFTER_LABELS": "0",
    "SSL_MEDSAM2__SAM2__DOWNLOAD": "false",
}


# --- the settings a container gets (no podman needed) -----------------------------------------------

def test_site_conf_reads_a_mounted_yaml_then_the_environment(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("app:\n  lease_hours: 2\n  embedding_grid: [4, 4, 2]\nsam2:\n  checkpoint: /weights/a.pt\n")
    env = {"SSL_MEDSAM2_CONF_FILE": str(site), "SSL_MEDSAM2__SAM2__CHECKPOINT": "/weights/b.pt",
           "SSL_MEDSAM2__APP__STATE_DIR": "/var/lib/ssl-medsam2/state", "OTHER": "x"}
    assert site_conf(env) == [("app.lease_hours", "2"), ("app.embedding_grid", "[4, 4, 2]"),
                              ("sam2.checkpoint", "/weights/a.pt"), ("app.state_dir", "/var/lib/ssl-medsam2/state"),
                              ("sam2.checkpoint", "/weights/b.pt")]  # the environment's pair comes later: it wins
    site.write_text("- not sections\n")
    with pytest.raises(ValueError, match="expected config sections"):
        site_conf(env)


# --- podman -------------------------------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(DEPLOY / "ci" / "containers.conf")  # never the system's own
    env["DISABLE_HC_SYSTEMD"] = "true"  # no systemd here: `podman healthcheck run` instead of its timer
    return env


def _run(cmd: list, timeout: float, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd[:4]))} ... exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def images():
    missing = [t for t in ("podman", "podman-compose", "debootstrap")
               if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (Debian packages: podman runc podman-compose debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap makes the base image; the test uses rootful podman)")
    start = time.monotonic()
    _run(["bash", DEPLOY / "ci" / "build.sh", IMAGE], timeout=3600)
    inspect = json.loads(_run(["podman", "image", "inspect", IMAGE], 60).stdout)[0]
    return {"build_s": round(time.monotonic() - start, 1), "inspect": inspect,
            "base": os.environ.get("BASE_IMAGE", "localhost/bookworm-base"),
            "size_gb": round(inspect["Size"] / 1e9, 2)}


class Stack:
    """One podman-compose project of deploy/compose.yaml on free loopback ports, with its own volumes."""

    def __init__(self, root: Path):
        self.project = f"sslmedsam2test{os.getpid()}"
        self.port, self.orthanc_port, dicom_port = pacs.free_port(), pacs.free_port(), pacs.free_port()
        site = root / "site.env"
        site.write_text((DEPLOY / "site.env").read_text() + "".join(f"{k}={v}\n" for k, v in SITE_ENV.items()))
        self.env = {**_env(), "SSL_MEDSAM2_SITE_ENV": str(site), "SSL_MEDSAM2_PORT": str(self.port),
                    "ORTHANC_PORT": str(self.orthanc_port), "ORTHANC_DICOM_PORT": str(dicom_port),
                    "SSL_MEDSAM2_IMAGE": IMAGE}
        self.url = f"http://127.0.0.1:{self.port}"
        self.app, self.orthanc = f"{self.project}_app_1", f"{self.project}_orthanc_1"

    def compose(self, *args, timeout: float = 300, check: bool = True):
        return _run(["podman-compose", "-p", self.project, "-f", DEPLOY / "compose.yaml", *args], timeout,
                    env=self.env, check=check)

    def up(self, timeout: float = 600) -> float:
        """Start the stack; seconds until the app's /info/ answers 200."""
        start = time.monotonic()
        up = self.compose("up", "-d", "--no-build")
        deadline = start + timeout
        while time.monotonic() < deadline:
            running = _run(["podman", "ps", "--filter", f"label=io.podman.compose.project={self.project}",
                            "--format", "{{.Names}}"], 60).stdout.split()
            if sorted(running) != sorted([self.app, self.orthanc]):  # podman-compose exits 0 regardless
                time.sleep(3)  # a container restarting under `restart: unless-stopped` is gone briefly
                running = _run(["podman", "ps", "--filter", f"label=io.podman.compose.project={self.project}",
                                "--format", "{{.Names}}"], 60).stdout.split()
                if sorted(running) != sorted([self.app, self.orthanc]):
                    pytest.fail(f"running {running}, expected {self.app} and {self.orthanc}:\n"
                                f"{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
            try:
                if httpx.get(f"{self.url}/info/", timeout=10).status_code == 200:
                    return round(time.monotonic() - start, 1)
            except httpx.HTTPError:
                pass
            time.sleep(1)
        logs = _run(["podman", "logs", "--tail", "60", self.app], 60, check=False)
        pytest.fail(f"the app did not answer /info/ within {timeout} s:\n{logs.stdout}{logs.stderr}")

    def logs(self, tail: int = 80) -> str:
        """The app container's last log lines (for a failure message)."""
        out = _run(["podman", "logs", "--tail", str(tail), self.app], 60, check=False)
        return f"\n--- app log ---\n{out.stdout[-6000:]}{out.stderr[-6000:]}"

    def down(self, volumes: bool = False):
        self.compose("down", *(["-v"] if volumes else []), check=not volumes)
        if volumes:  # the end: podman-compose 1.0 leaves the project's network behind
            _run(["podman", "network", "rm", "-f", f"{self.project}_default"], 60, check=False)


@pytest.fixture(scope="module")
def stack(images, chaos_dir, tmp_path_factory):
    if not dicom_seg.dcmqi_tool():
        pytest.skip("dcmqi not installed (pip: dcmqi): labels go to Orthanc as DICOM-SEG")
    root = tmp_path_factory.mktemp("deploy")
    small_cases(chaos_dir, root, CASES)
    st = Stack(root)
    try:
        # the PACS holds the expert-labelled supports before the app starts; the other studies arrive
        # while it runs (a study sent later must be found when a request names it)
        st.compose("up", "-d", "--no-build", "orthanc")
        orthanc = pacs.Orthanc.connect(f"http://127.0.0.1:{st.orthanc_port}", timeout=60)
        series = pacs.upload_folder(orthanc, root / "images", root / "dicom", cases=LABELLED)
        for case in LABELLED:
            orthanc.upload([dicom_seg.label_to_dicom_seg(root / "labels" / f"{case}.nii.gz", root / "dicom" / case,
                                                     root / "dicom" / f"{case}_seg.dcm", class_names={1: "liver"})])
        start_s = st.up()
        series |= pacs.upload_folder(orthanc, root / "images", root / "dicom", cases=[SAVED])
        yield {"st": st, "orthanc": orthanc, "series": series, "root": root, "figures": {"start_s": start_s}}
    finally:
        st.down(volumes=True)


def _save(url: str, image: str, path: Path, timeout: float = 300) -> httpx.Response:
    with open(path, "rb") as fh:
        return httpx.put(f"{url}/datastore/label", params={"image": image, "tag": "final"},
                         files={"label": ("label.nii.gz", fh)},
                         data={"params": json.dumps({"client_id": "deploy-test",
                                                     "label_info": [{"name": "liver", "idx": 1}]})},
                         timeout=timeout)


def _liver_on_grid(label_path: Path, image_path: Path, out: Path) -> None:
    """Class 1 of ``label_path`` resampled (nearest) onto the grid of ``image_path``, as uint8 NIfTI."""
    import SimpleITK as sitk

    liver = sitk.ReadImage(str(label_path)) == 1
    grid = sitk.Resample(liver, sitk.ReadImage(str(image_path)), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(sitk.Cast(grid, sitk.sitkUInt8), str(out))


def _same_voxels(label_path: Path, seg_img) -> None:
    import SimpleITK as sitk

    sent = sitk.Resample(sitk.ReadImage(str(label_path)), seg_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sent) > 0, sitk.GetArrayFromImage(seg_img) > 0,
                                  err_msg="the SEG in Orthanc is not the label that was saved")


def test_layer_scan_sees_a_key_deleted_in_a_later_layer(images, tmp_path):
    """The scan's own check: a key and a .crt copied in and deleted in the next step stay in a lower
    layer, and the scan must say so (else its silence about the real image means nothing)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "site.pem").write_bytes(key)
    (tmp_path / "site.crt").write_text("not a real certificate\n")
    (tmp_path / "Containerfile").write_text(f"FROM {images['base']}\nCOPY site.pem site.crt /opt/\n"
                                            "RUN rm /opt/site.pem /opt/site.crt\n")
    probe = f"localhost/ssl-medsam2-scan-probe:{os.getpid()}"
    _run(["podman", "build", "-t", probe, tmp_path], 300)
    try:
        found = scan_layers(probe)
    finally:
        _run(["podman", "rmi", "-f", probe], 60, check=False)
    assert any("/opt/site.pem (a private key)" in f for f in found), found
    assert any("/opt/site.crt (certificate or key file)" in f for f in found), found


def test_image_is_non_root_has_a_healthcheck_and_no_secret_in_any_layer(images, stack):
    config = images["inspect"]["Config"]
    assert config["User"] == "app"
    assert _run(["podman", "exec", stack["st"].app, "id", "-u"], 60).stdout.strip() == "10001"
    assert "ssl-medsam2-healthcheck" in " ".join(images["inspect"].get("Healthcheck", {}).get("Test", []))
    assert _run(["podman", "healthcheck", "run", stack["st"].app], 60, check=False).returncode == 0
    env_secrets = [e for e in config.get("Env", []) if re.search(r"(TOKEN|SECRET|PASSWORD|PASSWD)=", e.upper())]
    assert not env_secrets, env_secrets
    history = _run(["podman", "history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE], 60).stdout
    assert not re.search(r"(token|secret|password)=\S", history, re.I), "a credential in a build step"
    findings = scan_layers(IMAGE)
    assert not findings, findings
    print(json.dumps({"image_size_gb": images["size_gb"], "image_build_s": images["build_s"]}))


def test_pseudo_label_save_kill_mid_save_restart_keeps_every_acknowledged_label(stack):
    st, orthanc, series, root = stack["st"], stack["orthanc"], stack["series"], stack["root"]
    url = st.url
    info = httpx.get(f"{url}/info/", timeout=30).json()
    assert "atlas_fewshot" in info["models"], info.get("unavailable_models")
    assert httpx.get(f"{url}/ohif/", timeout=30, follow_redirects=True).status_code == 200
    # 1. a pseudo label of a study that came into Orthanc as DICOM, over HTTP
    r = httpx.post(f"{url}/infer/atlas_fewshot", params={"image": series[SAVED], "output": "image"},
                   data={"params": "{}"}, timeout=600)
    assert r.status_code == 200, r.text[:500] + st.logs()
    label = root / f"{SAVED}_pseudo.nii.gz"
    label.write_bytes(r.content)
    # 2. saved as final through the app: a DICOM-SEG in Orthanc on that series, the same voxels
    start = time.monotonic()
    r = _save(url, series[SAVED], label)
    save_s = time.monotonic() - start
    assert r.status_code == 200, r.text
    segs = _seg_referencing(orthanc, series[SAVED])
    assert len(segs) == 1
    seg_img = _read_seg(orthanc, segs[0], root / "saved_seg.dcm")
    _same_voxels(label, seg_img)
    dice = _dice_with_truth(seg_img, root / "labels" / f"{SAVED}.nii.gz")
    assert dice > 0.7, f"the atlas pseudo label's liver Dice vs the expert label is {dice:.3f}"
    # 3. a model version (tiny nnU-Net run, the quality gate off: plumbing, not quality)
    r = httpx.post(f"{url}/train/ssl_nnunet", json=NNUNET_TINY, timeout=60)
    assert r.status_code == 200, r.text
    task = _wait_task(url, "train", 900)
    assert task["status"] == "DONE", "\n".join(task.get("details", [])[-30:])
    models = httpx.get(f"{url}/ssl_medsam2/models", timeout=30).json()
    assert models["current"] == "v001" and len(models["versions"]) == 1
    # 4. the app container killed in the middle of a second save (at half the first save's time), of a
    #    study sent after training (training would pseudo-label it first: a minute of CPU for nothing)
    series |= pacs.upload_folder(orthanc, root / "images", root / "dicom", cases=[KILLED])
    other = root / f"{KILLED}_label.nii.gz"  # the expert's liver (the app's classes: [1]) on the app's grid
    r = httpx.get(f"{url}/datastore/image", params={"image": series[KILLED]}, timeout=300)
    assert r.status_code == 200, r.text[:500]
    (root / f"{KILLED}_image.nii.gz").write_bytes(r.content)
    _liver_on_grid(root / "labels" / f"{KILLED}.nii.gz", root / f"{KILLED}_image.nii.gz", other)
    outcome: dict = {}

    def save_other():
        try:
            answer = _save(url, series[KILLED], other, timeout=120)
            outcome.update(status=answer.status_code, **({} if answer.status_code == 200 else {"body": answer.text}))
        except httpx.HTTPError as exc:
            outcome["error"] = repr(exc)

    saver = threading.Thread(target=save_other)
    saver.start()
    time.sleep(save_s / 2)
    _run(["podman", "kill", st.app], 60)
    saver.join(180)
    assert outcome.get("status") in (None, 200), outcome  # answered before the kill: it must be a valid save
    acknowledged = [SAVED] + ([KILLED] if outcome.get("status") == 200 else [])
    # 5. down and up again: same volumes
    st.down()
    restart_s = st.up()
    assert httpx.get(f"{url}/info/", timeout=30).status_code == 200
    for case in acknowledged:
        assert len(_seg_referencing(orthanc, series[case])) == 1, f"acknowledged label of {case} lost"
    killed_segs = _seg_referencing(orthanc, series[KILLED])
    assert len(killed_segs) <= 1
    if killed_segs:  # the interrupted save either landed whole or not at all
        _same_voxels(other, _read_seg(orthanc, killed_segs[0], root / "killed_seg.dcm"))
    stats = httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()
    assert stats["completed"] == len(LABELLED) + 1 + len(killed_segs), stats
    listing = httpx.get(f"{url}/datastore/?output=all", timeout=60)
    assert listing.status_code == 200 and series[SAVED] in listing.json()["objects"]
    after = httpx.get(f"{url}/ssl_medsam2/models", timeout=30).json()
    assert after["current"] == "v001" and after["versions"] == models["versions"]
    print(json.dumps({"stack_start_s": stack["figures"]["start_s"], "stack_restart_s": restart_s,
                      "save_s": round(save_s, 2), "killed_save": outcome, "atlas_liver_dice": round(dice, 3)}))


# --- what the layers hold ------------------------------------------------------------------------------

#: the public root CAs of Debian's ca-certificates package (and its bundle, links) are expected
_PUBLIC_CERTS = ("usr/share/ca-certificates/mozilla/", "etc/ssl/certs/")
#: a PEM private key with its body (header lines such as Proc-Type allowed), not the bare marker text
#: that key parsers (cryptography, google-auth, GnuTLS) hold as a constant
_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----\r?\n"
                          rb"(?:[\w-]+: [^\n]*\n)*\r?\n?[A-Za-z0-9+/=]{40,}")


def _machine_ca_markers() -> list[bytes]:
    """A distinctive line of each extra CA certificate of this machine (Debian's local CA folder)."""
    markers = []
    for crt in sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt")):
        lines = [ln for ln in crt.read_bytes().splitlines() if len(ln) == 64 and not ln.startswith(b"-----")]
        if len(lines) > 2:
            markers.append(lines[len(lines) // 2])
    return markers


def _layer_dirs(image: str) -> list[Path]:
    """Each layer of ``image`` as its own directory in podman's overlay storage (lower layers too,
    so a file added in one layer and deleted in a later one is still seen)."""
    graph_root, driver = _run(["podman", "info", "--format", "{{.Store.GraphRoot}} {{.Store.GraphDriverName}}"],
                              60).stdout.split()
    if driver != "overlay":
        pytest.skip(f"the layer scan reads overlay storage; this podman uses {driver}")
    digests = json.loads(_run(["podman", "image", "inspect", image], 60).stdout)[0]["RootFS"]["Layers"]
    layers = json.loads((Path(graph_root) / "overlay-layers" / "layers.json").read_text())
    by_digest = {layer["diff-digest"]: layer["id"] for layer in layers if layer.get("diff-digest")}
    return [Path(graph_root) / "overlay" / by_digest[d] / "diff" for d in digests]


def scan_layers(image: str, small: int = 4 << 20) -> list[str]:
    """What must not be in any layer: a certificate file outside Debian's public CA set, anything in
    the local CA folder, a PEM private key (outside compiled libraries), this machine's extra CA (by
    content, in any file up to ``small`` bytes: a CA bundle would carry it), pip or netrc credentials
    files, pip's build cache, what a server run left in the checkout's app folder."""
    markers = _machine_ca_markers()
    found = []
    for n, layer in enumerate(_layer_dirs(image)):
        for dirpath, _, files in os.walk(layer):
            rel_dir = os.path.relpath(dirpath, layer)
            for name in files:
                path = os.path.join(dirpath, name)
                rel = os.path.normpath(os.path.join(rel_dir, name))
                where = f"layer {n}: /{rel}"
                if rel.startswith("usr/local/share/ca-certificates/"):
                    found.append(f"{where} (the local CA folder)")
                if name.endswith((".crt", ".key", ".p12", ".pfx")) and not rel.startswith(_PUBLIC_CERTS):
                    found.append(f"{where} (certificate or key file)")
                if name in (".netrc", "pip.conf", ".pypirc") or rel.startswith(("run/secrets/", "root/.cache/pip")):
                    found.append(f"{where} (credentials or build cache)")
                if rel.startswith(tuple(f"opt/src/apps/ssl_medsam2/{d}/" for d in ("bin", "logs", "model", "state"))):
                    found.append(f"{where} (a server run's files from the build machine's checkout)")
                if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > small:
                    continue
                with open(path, "rb") as fh:
                    data = fh.read()
                # compiled libraries carry their self-test keys (GnuTLS's FIPS known-answer tests)
                if not data.startswith(b"\x7fELF") and _PRIVATE_KEY.search(data):
                    found.append(f"{where} (a private key)")
                if any(m in data for m in markers):
                    found.append(f"{where} (this machine's extra CA certificate)")
    return found
