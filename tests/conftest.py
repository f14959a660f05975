"""Shared fixtures: real CHAOS MRI from ../shared/data (skipped with a reason where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSL_MEDSAM2_SHARED_DATA", REPO.parent / "shared" / "data"))
CHAOS = SHARED_DATA / "chaos_t2spir"
TOTALSEG = SHARED_DATA / "totalseg_example"

# nnU-Net needs these set before it is imported anywhere; tests point them at throwaway dirs.
for _k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(_k, str(Path(os.environ.get("TMPDIR", "/tmp")) / "ssl_medsam2_tests" / _k))
os.environ.setdefault("nnUNet_compile", "false")


def load_script(name: str):
    """Import ``scripts/<name>.py`` as module ``name`` (tests reuse the scripts users run)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def chaos_cases() -> list[str]:
    return sorted(p.name[: -len("_0000.nii.gz")] for p in (CHAOS / "imagesTr").glob("*_0000.nii.gz"))


@pytest.fixture(scope="session")
def chaos_dir() -> Path:
    if not (CHAOS / "imagesTr").is_dir():
        pytest.skip(f"real CHAOS data not found at {CHAOS} (../shared/data beside the repo); "
                    "set SSL_MEDSAM2_SHARED_DATA to its folder to run this test")
    return CHAOS


@pytest.fixture(scope="session")
def totalseg_dir() -> Path:
    if not (TOTALSEG / "imagesTr").is_dir():
        pytest.skip(f"TotalSegmentator example data not found at {TOTALSEG}")
    return TOTALSEG


def downsample_case(src_img: Path, src_lab: Path | None, dst_img: Path, dst_lab: Path | None,
                    factor: int = 4, z_range: tuple[int, int] | None = None) -> None:
    """Write an in-plane downsampled (and optionally z-cropped) copy with a consistent affine."""
    img = nib.load(str(src_img))
    sl = (slice(None, None, factor), slice(None, None, factor), slice(*z_range) if z_range else slice(None))
    aff = img.affine.copy()
    aff[:3, 0] *= factor
    aff[:3, 1] *= factor
    if z_range:
        aff[:3, 3] += aff[:3, 2] * z_range[0]
    data = np.asarray(img.dataobj)[sl].astype(np.float32)
    dst_img.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, aff), str(dst_img))
    if src_lab is not None and dst_lab is not None:
        lab = np.asarray(nib.load(str(src_lab)).dataobj)[sl].astype(np.uint8)
        dst_lab.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lab, aff), str(dst_lab))


@pytest.fixture(scope="session")
def small_chaos(chaos_dir, tmp_path_factory) -> Path:
    """All CHAOS cases at 64x64 in-plane (factor 4), full z, nnU-Net raw layout; labels for every case."""
    root = tmp_path_factory.mktemp("chaos_small")
    for case in chaos_cases():
        downsample_case(chaos_dir / "imagesTr" / f"{case}_0000.nii.gz", chaos_dir / "labelsTr" / f"{case}.nii.gz",
                        root / "imagesTr" / f"{case}_0000.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    return root
