"""Check uploads before they reach the datastore, so a bad file is a 4xx with a reason and changes nothing.

Labels arrive as NIfTI (REST, Slicer), NRRD (Slicer) or raw uint8 bytes in Fortran order (OHIF's
``label.bin``); each is checked against its image (shape, and affine / origin / spacing / direction)
and rewritten as a uint8 NIfTI on exactly the image's grid and header. Class ids outside the app's
label set are refused, naming them. Sizes are checked from the file header before any voxel is
decompressed, so a small gzip bomb cannot make the server inflate gigabytes.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ssl_medsam2.io import InputError, label_values, load_label_for, load_volume, save_like

NIFTI = (".nii.gz", ".nii")
HEADER_BYTES = 1 << 20  # the most header text read to decide a non-NIfTI file's format
_NRRD_DATA_FILE = re.compile(rb"^\s*data\s?file\s*:", re.IGNORECASE | re.MULTILINE)
_META_DATA_FILE = re.compile(rb"^\s*ElementDataFile\s*=[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


def suffix_of(filename: str | None, default: str = ".nii.gz") -> str:
    name = (filename or "").lower()
    for ext in (".nii.gz", ".nrrd.gz", ".nii", ".nrrd", ".mha", ".mhd", ".bin", ".dcm"):
        if name.endswith(ext):
            return ext
    return "".join(Path(name).suffixes) or default


def _tmp(suffix: str, work_dir: str | os.PathLike | None = None) -> str:
    fd, p = tempfile.mkstemp(suffix=suffix, prefix="ssl_medsam2_upload_", dir=work_dir)
    os.close(fd)
    return p


def itk_io(path: str, shown_name: str) -> str:
    """The SimpleITK ImageIO for a non-NIfTI upload, chosen by its content, for a self-contained file only.

    Why: a detached NRRD header (``data file:``) or MetaImage (``ElementDataFile = /path``) makes
    SimpleITK read another file of the server, whose bytes would come back in error messages (class
    ids, sizes). Only NRRD and MetaImage with their data inside, or DICOM, are accepted, and the IO is
    pinned so that no other reader (e.g. one that follows a file name in its header) gets the file.
    """
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
    if head.startswith(b"NRRD"):
        end = re.search(rb"\r?\n\r?\n", head)
        if end is None or _NRRD_DATA_FILE.search(head[: end.start()]):
            raise InputError(shown_name, "NRRD with a separate data file ('data file' field or a detached "
                                         "header); send a self-contained .nrrd with the voxels inside")
        return "NrrdImageIO"
    if head[128:132] == b"DICM":
        return "GDCMImageIO"
    meta = _META_DATA_FILE.search(head)
    if meta is not None:
        if meta.group(1).strip().upper() != b"LOCAL":
            raise InputError(shown_name, "MetaImage with a separate data file (ElementDataFile is not LOCAL); "
                                         "send a self-contained .mha with the voxels inside")
        return "MetaImageIO"
    raise InputError(shown_name, "unsupported image format: send NIfTI (.nii.gz, .nii), a self-contained "
                                 "NRRD (.nrrd), MetaImage (.mha) or DICOM")


def declared_shape(path: str, shown_name: str) -> tuple[int, ...]:
    """The voxel grid a file's header declares, read without decompressing any voxel data."""
    io = None if path.endswith(NIFTI) else itk_io(path, shown_name)
    try:
        if io is None:
            return tuple(int(n) for n in nib.load(path).header.get_data_shape())
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.SetImageIO(io)
        reader.ReadImageInformation()
        return tuple(int(n) for n in reader.GetSize()) + ((reader.GetNumberOfComponents(),)
                                                           if reader.GetNumberOfComponents() > 1 else ())
    except Exception as exc:
        raise InputError(shown_name, f"unreadable image header ({type(exc).__name__})") from exc


def check_declared_size(path: str, shown_name: str, max_voxels: int) -> tuple[int, ...]:
    """Refuse a file whose header declares more than ``max_voxels`` voxels, or a gzipped NIfTI that
    holds more data than its header declares; both found without holding more than 1 MB in memory."""
    shape = declared_shape(path, shown_name)
    n = int(np.prod([max(1, s) for s in shape], dtype=np.float64))
    if n > max_voxels:
        raise InputError(shown_name, f"declares {shape} = {n} voxels, more than the server accepts "
                                     f"({max_voxels}, app.max_upload_voxels)")
    if path.endswith(".nii.gz"):
        img = nib.load(path)
        expected = int(getattr(img.dataobj, "offset", 352)) + n * int(img.header.get_data_dtype().itemsize)
        _check_gzip_length(path, expected, shown_name)
    return shape


def _check_gzip_length(path: str, limit: int, shown_name: str) -> None:
    """Decompress in 1 MB steps and stop as soon as the data exceeds ``limit`` bytes (gzip bombs);
    damaged gzip data is a 4xx reason too, never a 500."""
    import zlib

    try:
        _gzip_length(path, limit, shown_name)
    except zlib.error as exc:
        raise InputError(shown_name, f"damaged gzip data ({exc})") from exc


def _gzip_length(path: str, limit: int, shown_name: str) -> None:
    import zlib

    total, step = 0, 1 << 20
    with open(path, "rb") as fh:
        while True:  # one gzip member after another (concatenated members are valid gzip)
            z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data = fh.read(step)
            while data:
                total += len(z.decompress(data, step))
                while z.unconsumed_tail and total <= limit + 4096:
                    total += len(z.decompress(z.unconsumed_tail, step))
                if total > limit + 4096:  # NIfTI extensions are inside the data offset; allow some padding
                    raise InputError(shown_name, f"holds more than the {limit} bytes its header declares "
                                                 f"(decompression stopped)")
                if z.eof:
                    break
                data = fh.read(step)
            rest = z.unused_data + fh.read(2)
            if not z.eof or not rest.strip(b"\0"):
                return
            fh.seek(-len(rest), 1)


def read_itk(path: str, shown_name: str, what: str):
    """A non-NIfTI upload read by SimpleITK with the one reader its content names (:func:`itk_io`), or
    InputError saying the ``what`` (image / label) is unreadable."""
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(path, imageIO=itk_io(path, shown_name))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(shown_name, f"unreadable {what} file ({str(exc).strip().splitlines()[-1]})") from exc


REAL_KINDS = "biuf"  # numpy dtype kinds of real-valued voxels: bool, signed, unsigned, floating point


def check_voxel_type(path: str, shown_name: str, what: str) -> None:
    """Only real-valued scalar voxels, read from the header (no voxel decoded): complex, RGB / vector and
    other types are refused with the type they declare (an image or label of them has no meaning here)."""
    try:
        if path.endswith(NIFTI):
            dtype = nib.load(path).header.get_data_dtype()
            ok, name = dtype.kind in REAL_KINDS and dtype.fields is None, str(dtype)
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.SetImageIO(itk_io(path, shown_name))
            reader.ReadImageInformation()
            pid = reader.GetPixelID()
            name = sitk.GetPixelIDValueAsString(pid)
            ok = reader.GetNumberOfComponents() == 1 and pid not in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(shown_name, f"unreadable {what} header ({type(exc).__name__})") from exc
    if not ok:
        raise InputError(shown_name, f"{what} voxel type '{name}' is not real-valued scalar: send integer or "
                                     f"floating-point voxels (complex, RGB and vector types are not accepted)")


def check_image(path: str, shown_name: str) -> None:
    """A readable 3D image of real-valued voxels (NIfTI via nibabel, anything else via SimpleITK), or InputError."""
    check_voxel_type(path, shown_name, "image")
    if path.endswith(NIFTI):
        try:
            vol = load_volume(path)
            if not np.issubdtype(np.asarray(vol.array).dtype, np.number):
                raise InputError(path, f"voxel type {np.asarray(vol.array).dtype} is not a scalar image")
        except InputError as exc:
            raise InputError(shown_name, exc.problem) from exc
        except Exception as exc:  # e.g. RGB24 voxels: a reason, never a 500
            raise InputError(shown_name, f"unreadable image ({type(exc).__name__}: "
                                         f"{str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else ''})") from exc
        return
    img = read_itk(path, shown_name, "image")
    if img.GetDimension() != 3:
        raise InputError(shown_name, f"expected a 3D volume, got {img.GetDimension()}D")


def prepare_label(image_path: str, upload: str, shown_name: str, allowed: set[int] | None = None,
                  work_dir: str | os.PathLike | None = None) -> str:
    """Validate an uploaded label against its image (grid, and class ids in ``allowed`` when given);
    returns a temp uint8 NIfTI on the image grid (in ``work_dir``)."""
    if not image_path.endswith(NIFTI):
        raise InputError(image_path, "labels can only be checked against NIfTI images in this app")
    image = load_volume(image_path)
    ext = suffix_of(upload)
    try:
        if ext == ".bin":
            n = int(np.prod(image.source_shape))
            if os.path.getsize(upload) != n:
                raise InputError(shown_name, f"raw label has {os.path.getsize(upload)} bytes; the image "
                                             f"{image.source_shape} needs {n} (uint8, one per voxel)")
            src = np.fromfile(upload, dtype=np.uint8).reshape(image.source_shape, order="F")
            path = _tmp(".nii.gz", work_dir)
            try:
                nib.save(nib.Nifti1Image(src, image.source_affine, image.source_header), path)
                label = load_label_for(image, path)
            finally:
                os.unlink(path)
        else:
            shape = check_declared_size(upload, shown_name, int(np.prod(image.source_shape)))
            if tuple(shape[:3]) != tuple(image.source_shape) or any(s > 1 for s in shape[3:]):
                raise InputError(shown_name, f"label shape {shape} does not match image shape {image.source_shape}")
            check_voxel_type(upload, shown_name, "label")
            if ext in NIFTI:
                label = load_label_for(image, upload)
            else:
                label = _label_from_itk(image, image_path, upload, shown_name, work_dir)
    except InputError as exc:
        raise InputError(shown_name, exc.problem.replace(upload, shown_name)) from exc
    if allowed is not None:
        bad = sorted(set(int(v) for v in np.unique(label.array)) - set(allowed))
        if bad:
            raise InputError(shown_name, f"class ids {bad} are not in the app's label set {sorted(allowed)} "
                                         f"(input.class_names)")
    label_values(label.array, shown_name, max_id=255)  # stored as uint8
    out = _tmp(".nii.gz", work_dir)
    save_like(label.array.astype(np.uint8), image, out, dtype=np.uint8, description="ssl-medsam2 saved label")
    return out


def _label_from_itk(image, image_path: str, upload: str, shown_name: str, work_dir=None):
    """NRRD / MHA labels: compare physical geometry with the image as SimpleITK sees both."""
    import SimpleITK as sitk

    lab = read_itk(upload, shown_name, "label")
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
    arr = label_values(sitk.GetArrayFromImage(lab).transpose(2, 1, 0), shown_name, max_id=255)  # NIfTI voxel order
    path = _tmp(".nii.gz", work_dir)
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), image.source_affine, image.source_header), path)
    try:
        return load_label_for(image, path)
    finally:
        os.unlink(path)
