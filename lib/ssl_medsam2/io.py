"""Loading and saving volumes without ever losing geometry.

Every volume is read into the closest canonical (RAS+) voxel order so that supports and queries
acquired in different orientations line up slice by slice; it keeps the source affine, header and
the orientation transform needed to put any array back on the source grid (:class:`Volume` owns
both directions, 3D and channels-first 4D). Every NIfTI written by the project goes through
:func:`save_like`, which restores the source voxel order, affine and header. Every output file goes
through :func:`atomic_write` (temp file + rename, so a crash never leaves a half-written file, and
the user's umask decides the mode, as for any ordinary file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class InputError(ValueError):
    """Bad user input (file, shape, geometry, content). The message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


@dataclass
class Volume:
    """A 3D volume in canonical (RAS+) voxel order plus what is needed to go back to the source grid."""

    array: np.ndarray  # canonical voxel order, shape (X, Y, Z)
    affine: np.ndarray  # canonical affine (4x4)
    source_affine: np.ndarray  # affine of the file on disk
    source_header: Any  # nibabel header of the file on disk
    to_source: np.ndarray  # nibabel orientation transform canonical -> source
    path: str | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def source_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.source_header.get_data_shape()[:3])

    def like(self, array: np.ndarray, name: str | None = None) -> "Volume":
        """A new volume on the same grid (canonical order) holding ``array``."""
        if array.shape[-3:] != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match volume grid {self.array.shape}")
        return Volume(array, self.affine, self.source_affine, self.source_header, self.to_source,
                      self.path, name or self.name, dict(self.meta))

    def in_source_order(self, array: np.ndarray) -> np.ndarray:
        """Put a canonical-order array (3D, or 4D channels first) back in the file's voxel order."""
        return _reorient(array, self.to_source)

    def in_canonical_order(self, array: np.ndarray) -> np.ndarray:
        """Put a source-order array (3D, or 4D channels first) as stored on disk into canonical order."""
        return _reorient(array, _ornt_to_canonical(self.source_affine))

    def index_to_canonical(self, points) -> np.ndarray:
        """Voxel indices of the file on disk (``(n, 3)`` integers, e.g. a client's clicks) as indices into
        :attr:`array`: the same axis permutation and flips as :meth:`in_canonical_order`."""
        pts = np.asarray(points, dtype=np.int64).reshape(-1, 3)
        out = np.empty_like(pts)
        for src_axis, (axis, flip) in enumerate(_ornt_to_canonical(self.source_affine)):
            col = pts[:, src_axis]
            out[:, int(axis)] = self.source_shape[src_axis] - 1 - col if flip < 0 else col
        return out


def _ornt_to_canonical(affine: np.ndarray) -> np.ndarray:
    return nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(("R", "A", "S")))


def _reorient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3:
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, ornt))
    return np.stack([_reorient(a, ornt) for a in array])


def case_name(path: str | os.PathLike) -> str:
    """`chaos_01_0000.nii.gz` -> `chaos_01` (nnU-Net channel suffix dropped), `x.nii` -> `x`."""
    base = Path(path).name
    for suf in NIFTI_SUFFIXES:
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    parts = base.rsplit("_", 1)
    if len(parts) == 2 and len(parts[1]) == 4 and parts[1].isdigit():
        base = parts[0]
    return base


def list_volumes(folder: str | os.PathLike) -> dict[str, Path]:
    """Case name -> NIfTI path for every NIfTI file in ``folder`` (sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."):
            name = case_name(p)
            if name in out:
                raise InputError(p, f"two files map to the same case name '{name}' ({out[name].name})")
            out[name] = p
    return out


def read_nifti_3d(path: str | os.PathLike):
    """(nibabel image, 3D array in the file's voxel order), or an InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for truncated / non-NIfTI files
        raise InputError(path, f"unreadable image file ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D volume, got {data.ndim}D data of shape {tuple(data.shape)}")
    return img, data


def load_volume(path: str | os.PathLike, *, is_label: bool = False, name: str | None = None) -> Volume:
    """Read a 3D NIfTI into canonical order, with clear errors for the usual ways input goes wrong."""
    path = Path(path)
    img, data = read_nifti_3d(path)
    if min(data.shape) < 1:
        raise InputError(path, f"empty volume of shape {tuple(data.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "invalid (singular or non-finite) affine")
    if is_label:
        data = label_values(data, path)
    else:
        data = np.asarray(data, dtype=np.float32)
        if not np.all(np.isfinite(data)):
            n = int((~np.isfinite(data)).sum())
            raise InputError(path, f"image contains {n} NaN or infinite voxels")
    to_canon = _ornt_to_canonical(affine)
    to_source = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                                nib.orientations.io_orientation(affine))
    canon = _reorient(data, to_canon)
    canon_affine = affine @ nib.orientations.inv_ornt_aff(to_canon, data.shape)
    header = img.header.copy()
    return Volume(canon, canon_affine, affine, header, to_source, str(path), name or case_name(path))


INT16_MAX = 32767  # the largest class id a label map can hold (stored as int16)


def label_values(data: np.ndarray, path: str | os.PathLike | None, max_id: int | None = None) -> np.ndarray:
    """The one check of label voxel values: finite, exact integers, 0 <= id <= 32767 (and <= ``max_id``);
    as uint8 / int16.

    Why exact: a float volume holds class ids only if every value *is* one; rounding or casting would
    turn 65537.0 into class 1 and 1e30 into 0 without a word. Raises InputError naming ``path`` otherwise.
    """
    data = np.asarray(data)
    if data.size == 0:
        return data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)):
            raise InputError(path, "label contains NaN or infinite values")
        if not np.array_equal(np.floor(data), data):
            raise InputError(path, "label has non-integer values; expected integer class ids")
    lo, hi = data.min(), data.max()
    if lo < 0:
        raise InputError(path, f"label has negative class id {lo:g}")
    limit = INT16_MAX if max_id is None else min(int(max_id), INT16_MAX)
    if hi > limit:
        raise InputError(path, f"label has class id {hi:g} > {limit}")
    return data.astype(np.uint8 if hi < 256 else np.int16)


def load_label_for(image: Volume, path: str | os.PathLike, *, atol: float = 1e-3) -> Volume:
    """Read a label map and check that it lies on exactly the image's grid."""
    label = load_volume(path, is_label=True, name=image.name)
    if label.source_shape != image.source_shape:
        raise InputError(path, f"label shape {label.source_shape} does not match image shape "
                               f"{image.source_shape} ({image.path})")
    if not np.allclose(label.source_affine, image.source_affine, atol=atol):
        raise InputError(path, f"label affine differs from the image affine ({image.path}):\n"
                               f"{np.array2string(label.source_affine, precision=4)}\nvs\n"
                               f"{np.array2string(image.source_affine, precision=4)}")
    return label


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``dst`` shows the file ``src`` (a symlink to its real path; a copy where links are impossible).

    Why: nnU-Net exports and the app's training / batch folders gather existing volumes under new
    names without duplicating gigabytes.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.realpath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set-and-restore."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """The project's one file writer: ``write(tmp_path)`` fills a temp file beside ``path``, then rename.

    A crash never leaves a half-written ``path``. The file gets the mode an ordinary ``open()`` would
    give (0o666 minus the umask), not mkstemp's private 0600, so shared sites and servers running as
    another user can read outputs. The temp name keeps ``path``'s suffix (writers that pick the
    format from it, e.g. nibabel, see ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(s for s in path.suffixes[-2:])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_like(array: np.ndarray, like: Volume, path: str | os.PathLike, *, dtype=None,
              description: str | None = None) -> Path:
    """Write a canonical-order array (3D, or 4D with channels first) on ``like``'s source grid.

    The source affine (sform and qform, with their codes) and header are kept; a 4D array is written
    with channels last, as NIfTI expects.
    """
    path = Path(path)
    arr = like.in_source_order(np.asarray(array))
    if dtype is not None:
        arr = arr.astype(dtype)
    if arr.ndim == 4:
        arr = np.moveaxis(arr, 0, -1)
    header = like.source_header.copy()
    header.set_data_dtype(arr.dtype)
    img = nib.Nifti1Image(arr, like.source_affine, header=header)
    sform_code = int(like.source_header["sform_code"]) or 1
    qform_code = int(like.source_header["qform_code"]) or 1
    img.set_sform(like.source_affine, code=sform_code)
    img.set_qform(like.source_affine, code=qform_code)
    img.header.set_slope_inter(1.0, 0.0)
    if description:
        img.header["descrip"] = description.encode()[:79]
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """:func:`atomic_write` of a text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
