"""Label maps -> DICOM-SEG with dcmqi (``itkimage2segimage``), the one converter of the project.

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
from pathlib import Path

import numpy as np

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
