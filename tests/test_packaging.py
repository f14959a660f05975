"""A wheel of the project works outside the source tree (a Docker image, a cluster worker, ``pip install .``).

The wheel is built from a copy of the sources, installed non-editably into a fresh venv in a temp
folder, and run from there: ``--help`` of every command, then ``pseudo-label --engine atlas`` on two
real volumes. The venv sees the system's third-party packages through a ``.pth`` listing the system
site-packages folders (so torch etc. are not installed again), but not the system's ``.pth`` hooks,
so the editable install of this checkout cannot shadow the wheel; the test checks that it does not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def _run(cmd, cwd, timeout=300, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SSL_MEDSAM2_"))}
    env["PYTHONNOUSERSITE"] = "1"
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv (outside the repo) with the project's wheel installed, not editable."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("lib", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", src],
         cwd=root)
    (wheel,) = (root / "dist").glob("ssl_medsam2-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"ssl_medsam2/{p.relative_to(REPO / 'lib' / 'ssl_medsam2').as_posix()}"
                for p in (REPO / "lib" / "ssl_medsam2").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"ssl_medsam2/configs/{p.relative_to(REPO / 'configs').as_posix()}"
                 for p in (REPO / "configs").rglob("*") if p.is_file()}
    assert not expected - names, f"missing from the wheel (add the package to pyproject.toml): {sorted(expected - names)}"

    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=root)
    py = env_dir / "bin" / "python"
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    system = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (purelib / "_system_site_packages.pth").write_text("\n".join(sorted(system)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel], cwd=root)
    return env_dir


def test_wheel_imports_its_own_files(venv):
    out = _run([venv / "bin" / "python", "-c",
                "import sys, ssl_medsam2, ssl_medsam2.config as c; print(ssl_medsam2.__file__); print(c.CONFIG_DIR); "
                "print('\\n'.join(sys.path))"], cwd=venv.parent).stdout.splitlines()
    assert out[0].startswith(str(venv)), f"ssl_medsam2 imported from {out[0]}, not from the venv"
    assert out[1].startswith(str(venv)), f"configs read from {out[1]}, not from the installed package"
    assert str(REPO / "lib") not in out[2:], "the editable install of the checkout is on the venv's sys.path"


def test_every_command_has_help(venv):
    exe = venv / "bin" / "ssl-medsam2"
    top = _run([exe, "--help"], cwd=venv.parent).stdout
    commands = re.search(r"\{([\w,-]+)\}", top).group(1).split(",")
    assert {"pseudo-label", "run", "predict", "evaluate", "make-studies"} <= set(commands)
    for cmd in commands:
        assert "usage:" in _run([exe, cmd, "--help"], cwd=venv.parent).stdout


def test_app_starts_on_the_wheel(venv, tmp_path):
    """The MONAI Label app folder, copied beside a wheel install, builds against the wheel's library."""
    app = tmp_path / "app"
    shutil.copytree(REPO / "apps" / "ssl_medsam2", app, ignore=shutil.ignore_patterns("__pycache__", "bin", "logs",
                                                                                        "model", "state"))
    (tmp_path / "studies").mkdir()
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import ssl_medsam2; from main import create_app; "
            "info = create_app(sys.argv[1], sys.argv[2], {'sam2.checkpoint': 'none'}).info(); "
            "print(json.dumps({'lib': ssl_medsam2.__file__, 'models': sorted(info['models']), "
            "'trainers': sorted(info['trainers'])}))")
    out = _run([venv / "bin" / "python", "-c", code, app, tmp_path / "studies"], cwd=tmp_path).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["lib"].startswith(str(venv)), got["lib"]
    assert "atlas_fewshot" in got["models"] and "ssl_nnunet" in got["trainers"], got


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
