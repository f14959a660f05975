"""NIfTI <-> DICOM series, so a PACS (and OHIF, 3D Slicer) can hold the research data.

Why: radiology teams keep images in a PACS and MONAI Label's OHIF viewer only reads DICOMweb. The
research data (CHAOS, nnU-Net raw layout) is NIfTI, so we write it as DICOM series whose geometry
(ImagePositionPatient / ImageOrientationPatient / PixelSpacing / SliceThickness) comes straight from
the NIfTI affine: a NIfTI -> DICOM -> NIfTI round trip (SimpleITK, as MONAI Label converts DICOMweb
series) puts every voxel back at the same place in the patient.

UIDs are derived from the case name, so uploading the same folder twice is a no-op in the PACS.
Labels go to DICOM-SEG in :mod:`ssl_medsam2.dicom_seg`; a local Orthanc is :mod:`ssl_medsam2.pacs`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .io import InputError, atomic_write, current_umask, list_volumes

logger = logging.getLogger(__name__)

#: RAS (NIfTI world) -> LPS (DICOM patient coordinates).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
UID_ROOT = "1.2.826.0.1.3680043.10.1467."  # project prefix for name-derived UIDs (pydicom hashes the rest)


# --------------------------------------------------------------------------------------------------
# NIfTI -> DICOM
# --------------------------------------------------------------------------------------------------

def stable_uid(*parts: str) -> str:
    """A valid DICOM UID that depends only on ``parts`` (so re-uploads deduplicate in the PACS)."""
    from pydicom.uid import generate_uid

    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts])


@dataclass
class SeriesGeometry:
    """DICOM geometry of a NIfTI grid whose third voxel axis is the slice axis."""

    orientation: list[float]  # ImageOrientationPatient: row direction (along columns), column direction
    pixel_spacing: list[float]  # [between rows (along j), between columns (along i)]
    slice_thickness: float
    positions: list[list[float]]  # ImagePositionPatient per slice k

    @classmethod
    def from_affine(cls, affine: np.ndarray, n_slices: int) -> "SeriesGeometry":
        """Voxel (i, j, k) -> pixel column i, row j of slice k; directions and origin in LPS."""
        lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
        cols = lps[:3, :3]
        spacing = np.sqrt((cols ** 2).sum(axis=0))
        if np.any(spacing < 1e-9):
            raise ValueError(f"degenerate affine (zero voxel size): {affine}")
        dir_i, dir_j = cols[:, 0] / spacing[0], cols[:, 1] / spacing[1]
        if abs(float(dir_i @ dir_j)) > 1e-4:
            raise ValueError("in-plane axes are not orthogonal; DICOM cannot represent this grid")
        positions = [(lps @ np.array([0.0, 0.0, k, 1.0]))[:3].tolist() for k in range(n_slices)]
        return cls([*map(float, dir_i), *map(float, dir_j)], [float(spacing[1]), float(spacing[0])],
                   float(spacing[2]), positions)


def _pixel_encoding(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored integers plus RescaleSlope/Intercept: exact for integer data, <= slope/2 error otherwise."""
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    integral = np.issubdtype(data.dtype, np.integer) or bool(np.all(np.rint(finite) == finite))
    if integral and lo >= -32768 and hi <= 32767:
        return np.rint(data).astype(np.int16), 1.0, 0.0
    slope = (hi - lo) / 65000.0 if hi > lo else 1.0
    intercept = lo + 32500.0 * slope
    stored = np.clip(np.rint((data - intercept) / slope), -32768, 32767).astype(np.int16)
    return stored, float(slope), float(intercept)


def _ds(value: float) -> str:
    """A DICOM Decimal String (at most 16 characters)."""
    for prec in range(10, 0, -1):
        s = f"{value:.{prec}g}"
        if len(s) <= 16:
            return s
    return f"{value:.1e}"


def nifti_to_dicom_series(image: str | os.PathLike, out_dir: str | os.PathLike, *, case: str | None = None,
                          modality: str | None = None, study_description: str = "SSL-MedSAM2",
                          series_description: str | None = None, series_number: int = 1,
                          patient_name: str | None = None) -> list[Path]:
    """Write a 3D NIfTI as one DICOM file per slice (along the file's third axis) in ``out_dir``.

    Patient, study and series UIDs derive from ``case`` (default: the file's case name), so each case
    is its own patient/study with one series. Modality: ``CT`` when values below -500 exist, else MR.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from .io import case_name, read_nifti_3d

    image = Path(image)
    img, data = read_nifti_3d(image)
    if not np.all(np.isfinite(data)):
        raise InputError(image, "image contains NaN or infinite voxels")
    try:
        geo = SeriesGeometry.from_affine(img.affine, data.shape[2])
    except ValueError as exc:
        raise InputError(image, str(exc)) from exc

    case = case or case_name(image)
    modality = modality or ("CT" if float(data.min()) < -500 else "MR")
    stored, slope, intercept = _pixel_encoding(np.asarray(data))
    study_uid = stable_uid(case, "study")
    series_uid = stable_uid(case, "series", str(series_number))
    frame_uid = stable_uid(case, "frame")
    sop_class = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    today = _dt.date.today().strftime("%Y%m%d")

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)  # the temp folder must be beside out_dir (same filesystem)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{case}.", dir=out_dir.parent))
    paths = []
    try:
        for k in range(data.shape[2]):
            sop_uid = stable_uid(case, "series", str(series_number), "slice", str(k))
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = UID_ROOT + "1"
            ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.PatientName = patient_name or case
            ds.PatientID = case
            ds.PatientBirthDate, ds.PatientSex = "", "O"
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
            ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
            ds.StudyDescription = study_description
            ds.SeriesDescription = series_description or case
            ds.Modality = modality
            ds.Manufacturer = "SSL-MedSAM2 nifti_to_dicom_series"
            ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
            ds.PositionReferenceIndicator = ""
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.ImageOrientationPatient = [_ds(v) for v in geo.orientation]
            ds.ImagePositionPatient = [_ds(v) for v in geo.positions[k]]
            ds.PixelSpacing = [_ds(v) for v in geo.pixel_spacing]
            ds.SliceThickness = _ds(geo.slice_thickness)
            ds.SpacingBetweenSlices = _ds(geo.slice_thickness)
            normal = np.cross(geo.orientation[:3], geo.orientation[3:])
            ds.SliceLocation = _ds(float(np.dot(normal, geo.positions[k])))
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            plane = np.ascontiguousarray(stored[:, :, k].T)  # rows = j, columns = i
            ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
            if modality == "MR":
                ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "2D"
            else:
                ds.RescaleType, ds.KVP = "HU", ""
            ds.PixelData = plane.tobytes()
            p = tmp_dir / f"{case}_{k + 1:04d}.dcm"
            pydicom.dcmwrite(str(p), ds, write_like_original=False)
            paths.append(p)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.chmod(tmp_dir, 0o777 & ~current_umask())  # mkdtemp's 0700 -> an ordinary folder
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return [out_dir / p.name for p in paths]


def dicom_series_to_nifti(series_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Read a DICOM series the way MONAI Label's DICOMweb datastore does (SimpleITK/GDCM) and save NIfTI."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(series_dir))
    if not names:
        raise InputError(series_dir, "no DICOM series found")
    reader.SetFileNames(names)
    img = reader.Execute()
    return atomic_write(out_path, lambda tmp: sitk.WriteImage(img, str(tmp)))  # tmp keeps the suffix: the format


def convert_folder(images_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   cases: Sequence[str] | None = None, progress: Callable[[str], None] | None = None,
                   **kwargs) -> dict[str, list[Path]]:
    """Every NIfTI in ``images_dir`` (or the named ``cases``) -> ``out_dir/<case>/*.dcm``."""
    vols = list_volumes(images_dir)
    if cases:
        missing = [c for c in cases if c not in vols]
        if missing:
            raise InputError(images_dir, f"cases not found: {', '.join(missing)}")
        vols = {c: vols[c] for c in cases}
    out = {}
    from tqdm import tqdm

    for case, path in tqdm(vols.items(), desc="NIfTI -> DICOM", unit="case", disable=None):
        out[case] = nifti_to_dicom_series(path, Path(out_dir) / case, case=case, **kwargs)
        if progress:
            progress(case)
    return out
