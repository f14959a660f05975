"""A wheel of the project works on its own (a Docker image, a cluster worker, ``pip install .``).

The wheel is built from a copy of the sources and installed into a fresh venv **without** the
system's site-packages; from a folder outside the source tree the test then runs ``--help`` of every
command, ``--version``, ``pseudo-label --engine atlas`` on two real volumes, and ``ssl-medsam2 serve``
(the MONAI Label app shipped in the wheel) answering ``/info/``.

How the dependencies get into the venv (``SSL_MEDSAM2_PACKAGING_DEPS``):

- ``link`` (default): the distributions that the wheel's ``Requires-Dist`` names, followed
  recursively through their own requirements (markers and extras evaluated), are taken from this
  Python's installed set and hard-linked file by file (their ``RECORD``) into the venv. Nothing else
  is there, so an import of a package that ``pyproject.toml`` does not declare fails, and
  ``pip check`` in the venv fails on a declared version that is not met. Seconds instead of minutes:
  a pip install of torch (CUDA build) and the rest unpacks ~9 GB.
- ``pip``: ``pip install`` of the wheel with its dependencies from the package index, as a user
  would (slow: see docs/figures.md).
"""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

pytestmark = pytest.mark.slow

INSTALL_TIMEOUT = 1800  # a cold install of torch & co. from the package index


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "SSL_MEDSAM2_", "VIRTUAL_ENV", "nnUNet_"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(cmd, cwd, timeout=300, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                         timeout=timeout, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _build_wheel(root: Path) -> Path:
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc", "logs", "model", "bin")
    for name in ("lib", "configs", "apps"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", src],
         cwd=root)
    (wheel,) = (root / "dist").glob("ssl_medsam2-*.whl")
    return wheel


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


#: run by the venv's Python: the wheel's requirements, followed recursively, each installed at a fitting version
CHECK_REQUIREMENTS = """
import importlib.metadata as m, json
from packaging.requirements import Requirement
problems, seen, todo = [], set(), [(r, "") for r in m.requires("ssl-medsam2") or []]
while todo:
    text, extra = todo.pop()
    req = Requirement(text)
    if req.marker and not req.marker.evaluate({"extra": extra}):
        continue
    try:
        dist = m.distribution(req.name)
    except m.PackageNotFoundError:
        problems.append(f"{req} is not installed")
        continue
    if not req.specifier.contains(dist.version, prereleases=True):
        problems.append(f"{req}: {dist.version} is installed")
    for e in ("", *sorted(req.extras)):
        if (req.name.lower(), e) not in seen:
            seen.add((req.name.lower(), e))
            todo += [(sub, e) for sub in dist.requires or []]
print(json.dumps(sorted(set(problems))))
"""


def _dependency_closure(requires: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that ``requires`` needs, recursively (extras and markers evaluated)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in requires]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name not in found:
            try:
                found[name] = importlib.metadata.distribution(req.name)
            except importlib.metadata.PackageNotFoundError:
                pytest.fail(f"{req} (needed by the wheel) is not installed here: run bash setup.sh")
        dist = found[name]
        assert req.specifier.contains(dist.version, prereleases=True), \
            f"installed {req.name} {dist.version} does not meet {req}: run bash setup.sh"
        for e in ("", *sorted(req.extras)):  # the base requirements, then those of each extra asked for
            if (name, e) not in seen:
                seen.add((name, e))
                todo += [(Requirement(sub), e) for sub in dist.requires or []]
    return list(found.values())


def _link_distribution(dist: importlib.metadata.Distribution, site_packages: Path) -> int:
    """Hard-link (symlink across file systems) one installed distribution's files into ``site_packages``."""
    base = Path(dist.locate_file(""))
    n = 0
    for f in dist.files or []:
        rel = Path(f)
        if rel.is_absolute() or ".." in rel.parts or "__pycache__" in rel.parts:
            continue  # console scripts (../../bin) point at the system Python; bytecode is rebuilt
        src, dst = base / rel, site_packages / rel
        if not src.is_file() or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another file system: a symbolic link (a copy would be gigabytes)
            os.symlink(src, dst)
        n += 1
    return n


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv without system site-packages holding the project's wheel and its declared dependencies."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(root)
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"ssl_medsam2/{p.relative_to(REPO / 'lib' / 'ssl_medsam2').as_posix()}"
                for p in (REPO / "lib" / "ssl_medsam2").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"ssl_medsam2/configs/{p.relative_to(REPO / 'configs').as_posix()}"
                 for p in (REPO / "configs").rglob("*") if p.is_file()}
    app = REPO / "apps" / "ssl_medsam2"
    written = {"__pycache__", "logs", "model", "bin"}  # by a server or Python at run time
    expected |= {f"ssl_medsam2/app/{p.relative_to(app).as_posix()}" for p in app.rglob("*")
                 if p.is_file() and p.name != ".gitignore" and p.suffix != ".pyc"
                 and not written & set(p.relative_to(app).parts)}
    assert not expected - names, f"missing from the wheel (add the package to pyproject.toml): {sorted(expected - names)}"

    env_dir = root / "venv"
    py = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", py]  # this Python's pip, acting on the venv
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=root)  # no --system-site-packages
    if os.environ.get("SSL_MEDSAM2_PACKAGING_DEPS", "link") == "pip":
        _run([*pip, "install", "-q", wheel], cwd=root, timeout=INSTALL_TIMEOUT)
    else:
        site_packages = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  cwd=root).stdout.strip())
        requires = _metadata(wheel).get_all("Requires-Dist") or []
        for dist in _dependency_closure(requires):
            _link_distribution(dist, site_packages)
        _run([*pip, "install", "-q", "--no-deps", "--no-index", wheel], cwd=root)
    # every declared dependency is there, at a version that fits (`pip check` stumbles on itk's WHEEL tag)
    problems = json.loads(_run([py, "-c", CHECK_REQUIREMENTS], cwd=root).stdout)
    assert not problems, f"the venv does not satisfy the wheel's requirements: {problems}"
    return env_dir


def test_venv_is_isolated_and_imports_its_own_files(venv, tmp_path):
    code = ("import sys, site, ssl_medsam2, ssl_medsam2.config as c, yaml, torch, monailabel; "
            "print(json.dumps({'pkg': ssl_medsam2.__file__, 'configs': str(c.CONFIG_DIR), 'yaml': yaml.__file__, "
            "'torch': torch.__file__, 'monailabel': monailabel.__file__, 'path': sys.path}))")
    got = json.loads(_run([venv / "bin" / "python", "-c", "import json; " + code], cwd=tmp_path).stdout)
    for what in ("pkg", "configs", "yaml", "torch", "monailabel"):
        assert got[what].startswith(str(venv)), f"{what} comes from {got[what]}, not from the venv"
    system = {p for p in sys.path if p.endswith("site-packages")}
    assert not system & set(got["path"]), "the venv sees the system's site-packages"
    assert str(REPO / "lib") not in got["path"], "the checkout is on the venv's sys.path"


def test_every_command_has_help_and_version(venv, tmp_path):
    exe = venv / "bin" / "ssl-medsam2"
    top = _run([exe, "--help"], cwd=tmp_path).stdout
    commands = re.search(r"\{([\w,-]+)\}", top).group(1).split(",")
    assert {"pseudo-label", "run", "predict", "evaluate", "make-studies", "serve"} <= set(commands)
    for cmd in commands:
        assert "usage:" in _run([exe, cmd, "--help"], cwd=tmp_path).stdout
    version = _run([exe, "--version"], cwd=tmp_path).stdout.strip()
    installed = _run([venv / "bin" / "python", "-c", "import importlib.metadata as m; print(m.version('ssl-medsam2'))"],
                     cwd=tmp_path).stdout.strip()
    assert version == f"ssl-medsam2 {installed}", version


def test_wheel_pseudo_labels_two_real_volumes(venv, chaos_dir, tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for case in ("chaos_01", "chaos_02"):
        os.symlink(chaos_dir / "imagesTr" / f"{case}_0000.nii.gz", images / f"{case}_0000.nii.gz")
    os.symlink(chaos_dir / "labelsTr" / "chaos_01.nii.gz", labels / "chaos_01.nii.gz")
    fast = ["atlas.working_spacing=[6,6,0]", "atlas.deformable=none", "atlas.affine_iterations=20",
            "atlas.affine_shrink=[1]", "atlas.affine_smooth_mm=[0]", "atlas.fusion=mean", "input.classes=[1]"]
    _run([venv / "bin" / "ssl-medsam2", "pseudo-label", "--engine", "atlas", "--images", images, "--labels", labels,
          "--out", tmp_path / "out", *[a for s in fast for a in ("--set", s)]], cwd=tmp_path, timeout=600)
    for sub in ("labels", "probabilities", "entropy"):
        assert (tmp_path / "out" / sub / "chaos_02.nii.gz").is_file()
    assert (tmp_path / "out" / "summaries" / "chaos_02.json").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_the_shipped_app(venv, chaos_dir, tmp_path):
    """``ssl-medsam2 serve`` from outside the tree: the wheel's app, copied beside the studies, answers /info/."""
    exe = venv / "bin" / "ssl-medsam2"
    studies = tmp_path / "studies"
    _run([exe, "make-studies", "--images", chaos_dir / "imagesTr", "--labels", chaos_dir / "labelsTr",
          "--out", studies, "--cases", "chaos_01"], cwd=tmp_path)
    for extra in studies.glob("*.nii.gz"):  # one labelled and one unlabelled image are enough
        if extra.name not in ("chaos_01.nii.gz", "chaos_02.nii.gz"):
            extra.unlink()
    port = _free_port()
    env = dict(_env(), MONAI_LABEL_AUTO_UPDATE_SCORING="false")
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([str(exe), "serve", "--studies", str(studies), "--port", str(port),
                                 "--conf", "sam2.checkpoint", "none", "--conf", "app.retrain_after_labels", "0"],
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        info, deadline = None, time.time() + 240
        while time.time() < deadline and info is None:
            assert proc.poll() is None, f"server exited: {(tmp_path / 'server.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=5) as r:
                    info = json.load(r)
            except OSError:
                time.sleep(1)
        assert info is not None, f"server did not start: {(tmp_path / 'server.log').read_text()[-3000:]}"
        assert "atlas_fewshot" in info["models"] and "ssl_nnunet" in info["trainers"], info
        app_dir = studies / ".ssl_medsam2" / "app"
        assert (app_dir / "main.py").is_file() and (app_dir / "logs").is_dir()  # the writable copy it serves
        cmdline = (Path("/proc") / str(proc.pid) / "cmdline").read_bytes().split(b"\0")
        assert b"monailabel.main" in cmdline and str(app_dir).encode() in cmdline  # serve became the server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
