"""Where the real data lives and small copies of it: shared by the benches and the tests.

Why here: benches are run by users without pytest, so their helpers cannot live in
``tests/conftest.py``; the tests import these from here (``tests/conftest.py`` re-exports them).
The data is ``../shared/data`` beside the repository, or ``$SSL_MEDSAM2_SHARED_DATA``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSL_MEDSAM2_SHARED_DATA", REPO.parent / "shared" / "data"))
CHAOS = SHARED_DATA / "chaos_t2spir"
TOTALSEG = SHARED_DATA / "totalseg_example"


def chaos_cases(root: Path = CHAOS) -> list[str]:
    """Case names of an nnU-Net-style folder (``imagesTr/<case>_0000.nii.gz``), sorted."""
    return sorted(p.name[: -len("_0000.nii.gz")] for p in (Path(root) / "imagesTr").glob("*_0000.nii.gz"))


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


def organ_slab(label: np.ndarray, pad: int = 1) -> tuple[int, int]:
    """The z range (start, stop) of a label's organs, ``pad`` slices either side (a scan cropped to them)."""
    zs = np.flatnonzero(np.asarray(label).any(axis=(0, 1)))
    return max(0, int(zs[0]) - pad), min(label.shape[2], int(zs[-1]) + 1 + pad)


@contextmanager
def work_folder(keep: str | os.PathLike | None, prefix: str, fresh: bool = False) -> Iterator[Path]:
    """A bench's working folder: ``keep`` if given (emptied first with ``fresh``), else a temp dir removed after."""
    if keep:
        root = Path(keep)
        if fresh and root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
