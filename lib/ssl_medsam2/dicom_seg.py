"""Label maps <-> DICOM-SEG: written with dcmqi (``itkimage2segimage``), the one converter of the project;
read back with :func:`read_seg` / :func:`seg_to_label` onto the grid of the image the SEG references.

Why dcmqi: MONAI Label converts DICOM-SEG with the same tool, so the app and the PACS scripts write
identical objects; the PyPI wheel ``dcmqi`` ships the binaries, so it works offline.
:func:`dcmqi_bin_dir` is the one lookup (the app puts it on PATH for MONAI Label).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dicom import RAS_TO_LPS
from .io import InputError, atomic_write, label_values, read_nifti_3d


def dcmqi_bin_dir() -> Path | None:
    """The ``bin`` folder of the PyPI package ``dcmqi`` (it ships the converters), or None."""
    try:
        import dcmqi
    except ImportError:
        return None
    path = Path(dcmqi.__file__).resolve().parent / "bin"
    return path if (path / "itkimage2segimage").exists() else None


def dcmqi_tool(name: str = "itkimage2segimage") -> str | None:
    """Path of a dcmqi converter: on PATH, else in the ``dcmqi`` package; None when absent."""
    found = shutil.which(name)
    if found:
        return found
    bin_dir = dcmqi_bin_dir()
    return str(bin_dir / name) if bin_dir is not None and (bin_dir / name).exists() else None


def label_to_dicom_seg(label: str | os.PathLike, series_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                       class_names: dict[int, str] | None = None, series_description: str = "final",
                       algorithm: str = "MANUAL") -> Path:
    """A NIfTI label map on the image grid -> one DICOM-SEG referencing the series in ``series_dir``."""
    exe = dcmqi_tool()
    if exe is None:
        raise FileNotFoundError("dcmqi's itkimage2segimage not found (pip install dcmqi)")
    label = Path(label)
    ids = [int(v) for v in np.unique(label_values(read_nifti_3d(label)[1], label)) if v > 0]
    if not ids:
        raise InputError(label, "label map is empty; DICOM-SEG needs at least one segment")
    names = {int(k): str(v) for k, v in (class_names or {}).items()}
    segments = [{
        "labelID": i, "SegmentLabel": names.get(i, f"class_{i}"), "SegmentDescription": names.get(i, f"class_{i}"),
        "SegmentAlgorithmType": algorithm,
        **({"SegmentAlgorithmName": "SSL-MedSAM2"} if algorithm != "MANUAL" else {}),
        "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                  "CodeMeaning": "Anatomical Structure"},
        "SegmentedPropertyTypeCodeSequence": {"CodeValue": "78961009", "CodingSchemeDesignator": "SCT",
                                              "CodeMeaning": names.get(i, f"class_{i}")},
    } for i in ids]
    meta = {"ContentCreatorName": "SSL-MedSAM2", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
            "SeriesDescription": series_description, "SeriesNumber": "300", "InstanceNumber": "1",
            "segmentAttributes": [segments], "ContentLabel": "SEGMENTATION",
            "ContentDescription": "SSL-MedSAM2 label", "ClinicalTrialCoordinatingCenterName": "SSL-MedSAM2",
            "BodyPartExamined": ""}

    def convert(tmp_out: str) -> None:
        res = subprocess.run([exe, "--inputImageList", str(label), "--inputDICOMDirectory", str(series_dir),
                              "--outputDICOM", str(tmp_out), "--inputMetadata", str(meta_path)],
                             capture_output=True, text=True)
        if res.returncode != 0 or os.path.getsize(tmp_out) == 0:
            raise InputError(label, f"itkimage2segimage failed ({res.returncode}): {res.stderr[-2000:] or res.stdout[-2000:]}")

    with tempfile.TemporaryDirectory() as tmp:  # only the metadata; the DICOM-SEG is written beside out_path
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta))
        return atomic_write(out_path, convert)


# --------------------------------------------------------------------------------------------------
# DICOM-SEG -> label map on its image's grid
# --------------------------------------------------------------------------------------------------

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
GRID_TOLERANCE_VOXELS = 0.05  # a frame's corner must fall this close to an image voxel centre


@dataclass
class SegObject:
    """A parsed DICOM-SEG: the series it annotates and its segments (number -> label)."""

    dataset: object
    referenced_series: str
    study: str
    segments: dict[int, str]


def read_seg(source, shown_name: str = "DICOM-SEG") -> SegObject:
    """A DICOM-SEG from bytes, a path or a pydicom Dataset; InputError for anything else.

    Why: a viewer's export (OHIF) or a PACS copy is checked like any upload before it becomes a label.
    """
    import io as _io

    import pydicom
    from pydicom.errors import InvalidDicomError

    ds = source
    if not isinstance(source, pydicom.Dataset):
        try:
            ds = pydicom.dcmread(_io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source))
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError) as exc:
            raise InputError(shown_name, f"not a DICOM object ({type(exc).__name__})") from exc
    sop = str(ds.get("SOPClassUID", "") or "")
    if sop != SEG_SOP_CLASS or str(ds.get("Modality", "")) != "SEG":
        raise InputError(shown_name, f"only a DICOM-SEG (SOP class {SEG_SOP_CLASS}) is stored here; got SOP class "
                                     f"{sop or 'none'}, modality {ds.get('Modality', 'none')}")
    refs = ds.get("ReferencedSeriesSequence") or []
    if len(refs) != 1 or not refs[0].get("SeriesInstanceUID"):
        raise InputError(shown_name, "a DICOM-SEG must reference exactly one image series (ReferencedSeriesSequence)")
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "") or "") for s in ds.get("SegmentSequence") or []}
    if not segments:
        raise InputError(shown_name, "the DICOM-SEG has no segments (SegmentSequence)")
    return SegObject(ds, str(refs[0].SeriesInstanceUID), str(ds.get("StudyInstanceUID", "")), segments)


def _name_key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def segment_label_ids(segments: dict[int, str], class_names: dict[int, str], allowed: set[int] | None,
                      shown_name: str = "DICOM-SEG", *, reading: bool = False) -> dict[int, int]:
    """Segment number -> the app's class id, by name (``Liver``, ``right kidney`` = ``right_kidney``,
    ``class_2`` = 2); InputError naming every segment that maps to no class of the app.

    With no label set at all (``allowed`` None and no names) the segment numbers are the ids.
    ``reading`` (a label the PACS already holds, e.g. a seed label with more organs than the app segments):
    segments of other organs map to 0 (left out) instead of refusing the label, and where the app knows its
    class ids but no names, a segment whose name matches none is read by its number; InputError only when
    no segment is left. A save (STOW) is never ``reading``: what it stores must name the app's classes."""
    by_name = {_name_key(n): int(c) for c, n in class_names.items()}
    for c in (allowed or ()):
        by_name.setdefault(f"class{int(c)}", int(c))
    if allowed is None and not class_names:
        return {n: n for n in segments}
    out, bad = {}, []
    for number, label in sorted(segments.items()):
        cid = by_name.get(_name_key(label))
        if _name_key(label) == "background":  # a client's background segment (OHIF makes one from the models'
            out[number] = 0                    # labels): its voxels are no organ
            continue
        if cid is None and reading and not class_names and allowed and number in allowed:
            cid = number
        if cid is None or cid == 0 or (allowed is not None and cid not in allowed):
            bad.append(f"{number} '{label}'")
            if reading:
                out[number] = 0
        else:
            out[number] = cid
    if reading and any(out.values()):
        return out
    if bad:
        known = ", ".join(f"'{class_names.get(c, f'class_{c}')}'" for c in sorted(set(by_name.values())) if c)
        raise InputError(shown_name, f"segments {', '.join(bad)} name no class of the app's label set "
                                     f"({known or 'none'}; input.class_names)")
    return out


def _frame_geometry(ds, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, orientation, pixel spacing) of frame ``k``: per-frame groups first, then shared."""
    per = (ds.get("PerFrameFunctionalGroupsSequence") or [None] * (k + 1))[k]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]

    def find(seq: str, attr: str):
        for group in (per, shared):
            if group is not None and group.get(seq) and group.get(seq)[0].get(attr) is not None:
                return np.asarray([float(v) for v in group.get(seq)[0].get(attr)])
        return None

    pos = find("PlanePositionSequence", "ImagePositionPatient")
    orient = find("PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = find("PixelMeasuresSequence", "PixelSpacing")
    if pos is None or orient is None or spacing is None:
        raise ValueError(f"frame {k + 1} has no position, orientation or pixel spacing")
    return pos, orient, spacing


def _frame_segment(ds, k: int) -> int:
    per = (ds.get("PerFrameFunctionalGroupsSequence") or [None] * (k + 1))[k]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    for group in (per, shared):
        if group is not None and group.get("SegmentIdentificationSequence"):
            return int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    raise ValueError(f"frame {k + 1} names no segment")


def _unit_axis(vec: np.ndarray) -> bool:
    return bool(np.isclose(np.abs(vec).max(), 1.0, atol=1e-3) and np.isclose(np.abs(vec).sum(), 1.0, atol=2e-3))


def seg_to_label(seg: SegObject, affine: np.ndarray, shape: tuple[int, int, int], label_ids: dict[int, int],
                 shown_name: str = "DICOM-SEG") -> np.ndarray:
    """The SEG as a uint8 label map in the voxel order of the NIfTI grid (``affine``, ``shape``), with
    segment numbers replaced by ``label_ids``; InputError unless every frame lies on that grid.

    Why: a SEG holds only the frames that have a segment (dcmqi, OHIF); converting it on its own extent
    gives a label on another grid than its image. Each frame is placed by its position and orientation,
    so the label is on the image's grid, whichever slices the SEG covers and in whatever order."""
    ds = seg.dataset
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as exc:
        raise InputError(shown_name, f"unreadable segment frames ({type(exc).__name__})") from exc
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = frames.reshape(n, int(ds.Rows), int(ds.Columns))
    if str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        frames = frames > (float(ds.get("MaximumFractionalValue", 255)) / 2)
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    to_voxel = np.linalg.inv(lps)
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)
    rows, cols = np.nonzero(np.ones((int(ds.Rows), int(ds.Columns)), dtype=bool))
    for k in range(n):
        try:
            pos, orient, spacing = _frame_geometry(ds, k)
            number = _frame_segment(ds, k)
        except (ValueError, AttributeError, TypeError, IndexError) as exc:
            raise InputError(shown_name, f"DICOM-SEG frame geometry unreadable: {exc}") from exc
        if number not in label_ids:
            raise InputError(shown_name, f"frame {k + 1} belongs to segment {number}, which the SEG does not define")
        origin = (to_voxel @ np.append(pos, 1.0))[:3]
        step_col = to_voxel[:3, :3] @ (orient[:3] * spacing[1])  # one column further
        step_row = to_voxel[:3, :3] @ (orient[3:] * spacing[0])  # one row further
        corners = [origin + step_col * c + step_row * r for r in (0, int(ds.Rows) - 1) for c in (0, int(ds.Columns) - 1)]
        off_grid = not (_unit_axis(step_col) and _unit_axis(step_row)) or \
            np.abs(origin - np.rint(origin)).max() > GRID_TOLERANCE_VOXELS
        outside = any(np.any(np.rint(c) < 0) or np.any(np.rint(c) > np.asarray(shape) - 1) for c in corners)
        if off_grid or outside:
            where = "is not on" if off_grid else "lies outside"
            raise InputError(shown_name, f"frame {k + 1} {where} the image's grid {tuple(shape)} (position "
                                         f"{tuple(round(float(v), 2) for v in pos)}, spacing "
                                         f"{tuple(round(float(v), 3) for v in spacing)}): the SEG was made on another "
                                         f"grid than the image it references")
        mask = frames[k].ravel() > 0
        if not mask.any() or label_ids[number] == 0:  # 0: a segment of an organ the app does not segment
            continue
        idx = np.rint(origin[:, None] + np.outer(step_col, cols[mask]) + np.outer(step_row, rows[mask])).astype(int)
        out[idx[0], idx[1], idx[2]] = label_ids[number]
    return out


def seg_to_nifti(seg: SegObject, image: str | os.PathLike, out_path: str | os.PathLike,
                 label_ids: dict[int, int], shown_name: str = "DICOM-SEG") -> Path:
    """:func:`seg_to_label` written as a uint8 NIfTI with exactly the image's affine and header."""
    from .io import load_volume, save_like

    vol = load_volume(image)
    arr = seg_to_label(seg, vol.source_affine, vol.source_shape, label_ids, shown_name)
    return save_like(vol.in_canonical_order(arr), vol, out_path, dtype=np.uint8,
                     description="ssl-medsam2 label from DICOM-SEG")
