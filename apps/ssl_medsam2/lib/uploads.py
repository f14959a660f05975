"""Check uploads before they reach the datastore, so a bad file is a 4xx with a reason and changes nothing.

Labels arrive as NIfTI (REST, Slicer), NRRD (Slicer) or raw uint8 bytes in Fortran order (OHIF's
``label.bin``); each is checked against its image (shape, and affine / origin / spacing / direction)
and rewritten as a uint8 NIfTI on exactly the image's grid and header.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ssl_medsam2.io import InputError, load_label_for, load_volume, save_like

NIFTI = (".nii.gz", ".nii")


def suffix_of(filename: str | None, default: str = ".nii.gz") -> str:
    name = (filename or "").lower()
    for ext in (".nii.gz", ".nrrd.gz", ".nii", ".nrrd", ".mha", ".mhd", ".bin", ".dcm"):
        if name.endswith(ext):
            return ext
    return "".join(Path(name).suffixes) or default


def _tmp(suffix: str) -> str:
    fd, p = tempfile.mkstemp(suffix=suffix, prefix="ssl_medsam2_upload_")
    os.close(fd)
    return p


def check_image(path: str, shown_name: str) -> None:
    """A readable 3D image (NIfTI via nibabel, anything else via SimpleITK), or InputError."""
    if path.endswith(NIFTI):
        try:
            load_volume(path)
        except InputError as exc:
            raise InputError(shown_name, exc.problem) from exc
        return
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(path)
    except Exception as exc:
        raise InputError(shown_name, f"unreadable image file ({str(exc).strip().splitlines()[-1]})") from exc
    if img.GetDimension() != 3:
        raise InputError(shown_name, f"expected a 3D volume, got {img.GetDimension()}D")


def prepare_label(image_path: str, upload: str, shown_name: str) -> str:
    """Validate an uploaded label against its image; returns a temp uint8 NIfTI on the image grid."""
    if not image_path.endswith(NIFTI):
        raise InputError(image_path, "labels can only be checked against NIfTI images in this app")
    image = load_volume(image_path)
    ext = suffix_of(upload)
    try:
        if ext == ".bin":
            raw = np.fromfile(upload, dtype=np.uint8)
            n = int(np.prod(image.source_shape))
            if raw.size != n:
                raise InputError(shown_name, f"raw label has {raw.size} bytes; the image {image.source_shape} "
                                             f"needs {n} (uint8, one per voxel)")
            src = raw.reshape(image.source_shape, order="F")
            path = _tmp(".nii.gz")
            nib.save(nib.Nifti1Image(src, image.source_affine, image.source_header), path)
            label = load_label_for(image, path)
            os.unlink(path)
        elif ext in NIFTI:
            label = load_label_for(image, upload)
        else:
            label = _label_from_itk(image, image_path, upload, shown_name)
    except InputError as exc:
        raise InputError(shown_name, exc.problem.replace(upload, shown_name)) from exc
    if label.array.max() > 255:
        raise InputError(shown_name, f"label has class id {int(label.array.max())} > 255")
    out = _tmp(".nii.gz")
    save_like(label.array.astype(np.uint8), image, out, dtype=np.uint8, description="ssl-medsam2 saved label")
    return out


def _label_from_itk(image, image_path: str, upload: str, shown_name: str):
    """NRRD / MHA labels: compare physical geometry with the image as SimpleITK sees both."""
    import SimpleITK as sitk

    try:
        lab = sitk.ReadImage(upload)
    except Exception as exc:
        raise InputError(shown_name, f"unreadable label file ({str(exc).strip().splitlines()[-1]})") from exc
    ref = sitk.ReadImage(image_path)
    if lab.GetDimension() != 3 or lab.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(shown_name, "expected a single-channel 3D label map")
    if lab.GetSize() != ref.GetSize():
        raise InputError(shown_name, f"label shape {lab.GetSize()} does not match image shape {ref.GetSize()}")
    for what, a, b in (("origin", lab.GetOrigin(), ref.GetOrigin()), ("spacing", lab.GetSpacing(), ref.GetSpacing()),
                       ("direction", lab.GetDirection(), ref.GetDirection())):
        if not np.allclose(a, b, atol=1e-3):
            raise InputError(shown_name, f"label {what} {tuple(round(x, 4) for x in a)} differs from the image "
                                         f"{what} {tuple(round(x, 4) for x in b)}")
    arr = sitk.GetArrayFromImage(lab).transpose(2, 1, 0)  # NIfTI voxel order of the image file
    if not np.issubdtype(arr.dtype, np.integer):
        if np.abs(np.rint(arr) - arr).max() > 1e-3:
            raise InputError(shown_name, "label has non-integer values; expected integer class ids")
    if arr.min() < 0:
        raise InputError(shown_name, f"label has negative class id {int(arr.min())}")
    path = _tmp(".nii.gz")
    nib.save(nib.Nifti1Image(np.rint(arr).astype(np.uint8), image.source_affine, image.source_header), path)
    try:
        return load_label_for(image, path)
    finally:
        os.unlink(path)
