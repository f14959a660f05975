"""Shared fixtures: real CHAOS MRI from ../shared/data (skipped with a reason where it is absent)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from shared_data import CHAOS, REPO, TOTALSEG, chaos_cases, downsample_case  # noqa: E402,F401  (re-exported)

# nnU-Net needs these set before it is imported anywhere; tests point them at throwaway dirs.
for _k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(_k, str(Path(os.environ.get("TMPDIR", "/tmp")) / "ssl_medsam2_tests" / _k))
os.environ.setdefault("nnUNet_compile", "false")

#: Servers of tests that are not about it run without the background pseudo-label queue
#: (tests/test_team_server.py tests it): its jobs would compete for the 2 CPU cores and set uncertainty
#: scores that change which image a strategy hands out while a test runs.
NO_QUEUE = {"pseudo_store.enabled": "false"}


def outputs_on_source_grid(out: Path, case: str, source: Path, atol: float = 1e-5) -> tuple:
    """(label, probabilities, entropy) images a pseudo-label run wrote for ``case``, each checked to
    lie on ``source``'s grid (affine, shape, orientation): geometry is never lost on the way."""
    import nibabel as nib
    import numpy as np

    src = nib.load(str(source))
    imgs = tuple(nib.load(str(out / kind / f"{case}.nii.gz")) for kind in ("labels", "probabilities", "entropy"))
    for img in imgs:
        np.testing.assert_allclose(img.affine, src.affine, atol=atol)
        assert img.shape[:3] == src.shape and nib.aff2axcodes(img.affine) == nib.aff2axcodes(src.affine)
    return imgs


def fewshot_model(info: dict) -> str:
    """The few-shot model a client picks from /info: the fast atlas engine when it is available."""
    unavailable = info.get("unavailable_models") or {}
    for name in ("atlas_fewshot", "sam2_fewshot"):
        if name in info["models"] and name not in unavailable:
            return name
    pytest.fail(f"no few-shot model available: {unavailable}")


def load_script(name: str):
    """Import ``scripts/<name>.py`` as module ``name`` (tests reuse the scripts users run)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


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


@pytest.fixture(scope="session")
def small_chaos(chaos_dir, tmp_path_factory) -> Path:
    """All CHAOS cases at 64x64 in-plane (factor 4), full z, nnU-Net raw layout; labels for every case."""
    root = tmp_path_factory.mktemp("chaos_small")
    for case in chaos_cases():
        downsample_case(chaos_dir / "imagesTr" / f"{case}_0000.nii.gz", chaos_dir / "labelsTr" / f"{case}.nii.gz",
                        root / "imagesTr" / f"{case}_0000.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    return root


def organ_crop(chaos_dir: Path, case: str, organ: int, slices_before: int, slices_after: int, half_inplane: int = 48):
    """(image, spacing, label) of a CHAOS case at full resolution, canonical order, cropped around an organ's
    centre: ``2 x half_inplane`` voxels in-plane, the slices from ``slices_before`` below the centre to
    ``slices_after`` above it (the interactive engines' tests: a real organ in a volume of a few slices)."""
    from ssl_medsam2.io import load_label_for, load_volume

    vol = load_volume(chaos_dir / "imagesTr" / f"{case}_0000.nii.gz")
    truth = load_label_for(vol, chaos_dir / "labelsTr" / f"{case}.nii.gz").array
    c = np.argwhere(truth == organ).mean(0).astype(int)
    box = (slice(c[0] - half_inplane, c[0] + half_inplane), slice(c[1] - half_inplane, c[1] + half_inplane),
           slice(c[2] - slices_before, c[2] + slices_after + 1))
    return vol.array[box], vol.spacing, truth[box]
