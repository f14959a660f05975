"""NIfTI <-> DICOM series and a local Orthanc PACS, so OHIF and 3D Slicer can be tried on real images.

Why: radiology teams keep images in a PACS and MONAI Label's OHIF viewer only reads DICOMweb. The
research data (CHAOS, nnU-Net raw layout) is NIfTI, so we write it as DICOM series whose geometry
(ImagePositionPatient / ImageOrientationPatient / PixelSpacing / SliceThickness) comes straight from
the NIfTI affine: a NIfTI -> DICOM -> NIfTI round trip (SimpleITK, as MONAI Label converts DICOMweb
series) puts every voxel back at the same place in the patient.

UIDs are derived from the case name, so uploading the same folder twice is a no-op in the PACS.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import nibabel as nib
import numpy as np

from .config import CONFIG_DIR
from .io import InputError, list_volumes

logger = logging.getLogger(__name__)

#: RAS (NIfTI world) -> LPS (DICOM patient coordinates).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
UID_ROOT = "1.2.826.0.1.3680043.10.1467."  # project prefix for name-derived UIDs (pydicom hashes the rest)
DEFAULT_ORTHANC_CONFIG = CONFIG_DIR / "orthanc" / "orthanc.json"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


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
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{case}.", dir=out_dir.parent if out_dir.parent.exists() else None))
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
        out_dir.parent.mkdir(parents=True, exist_ok=True)
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
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(reader.Execute(), str(out_path))
    return out_path


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


# --------------------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable (Debian package `orthanc`), or None."""
    return shutil.which("Orthanc") or (shutil.which("Orthanc", path="/usr/sbin:/usr/bin"))


def orthanc_config(work_dir: str | os.PathLike, *, http_port: int = 8042,
                   template: str | os.PathLike = DEFAULT_ORTHANC_CONFIG) -> dict:
    """The shipped config with storage in ``work_dir`` and the port in both Orthanc and DICOMweb Host."""
    with open(template) as fh:
        cfg = json.load(fh)
    work_dir = Path(work_dir).resolve()
    cfg["StorageDirectory"] = str(work_dir / "storage")
    cfg["IndexDirectory"] = str(work_dir / "storage")
    cfg["HttpPort"] = int(http_port)
    cfg.setdefault("DicomWeb", {})["Host"] = f"127.0.0.1:{int(http_port)}"
    plugins = [p for p in cfg.get("Plugins", []) if Path(p).exists()]
    if not plugins:
        raise FileNotFoundError(f"Orthanc DICOMweb plugin not found ({cfg.get('Plugins')}); "
                                "install the Debian package orthanc-dicomweb")
    cfg["Plugins"] = plugins
    return cfg


def tail_lines(path: str | os.PathLike | None, n: int) -> str:
    """The last ``n`` lines of a server's log file ('' when there is none yet)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except (OSError, TypeError):
        return ""


def stop_process_group(process: subprocess.Popen | None, grace_s: float = 20.0) -> None:
    """End a server started with ``start_new_session=True`` and all its children: TERM, then KILL."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@dataclass
class Orthanc:
    """A local Orthanc process (loopback only, DICOMweb on) with its storage in ``work_dir``.

    ``Orthanc.start(work_dir)`` runs one; ``Orthanc.connect(url)`` talks to one already running.
    """

    work_dir: Path | None
    http_port: int = 8042
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    _log: object = field(default=None, repr=False)
    base_url: str | None = None

    @property
    def url(self) -> str:
        return self.base_url or f"http://127.0.0.1:{self.http_port}"

    @classmethod
    def connect(cls, url: str = "http://127.0.0.1:8042", timeout: float = 10.0) -> "Orthanc":
        server = cls(None, base_url=url.rstrip("/").removesuffix("/dicom-web"))
        server.wait_ready(timeout)
        return server

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @classmethod
    def start(cls, work_dir: str | os.PathLike, http_port: int | None = None, timeout: float = 60.0,
              template: str | os.PathLike = DEFAULT_ORTHANC_CONFIG) -> "Orthanc":
        exe = orthanc_binary()
        if exe is None:
            raise FileNotFoundError("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
        work_dir = Path(work_dir).resolve()
        port = http_port or free_port()
        cfg = orthanc_config(work_dir, http_port=port, template=template)
        conf_dir = work_dir / "config"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "orthanc.json").write_text(json.dumps(cfg, indent=2))
        log_path = work_dir / "orthanc.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen([exe, str(conf_dir)], stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(work_dir), start_new_session=True)
        server = cls(work_dir, port, proc, log_path, log)
        server.wait_ready(timeout)
        logger.info("Orthanc ready at %s (storage %s)", server.url, cfg["StorageDirectory"])
        return server

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.process.returncode}; see {self.log_path}:\n"
                                   + self.log_tail())
            try:
                self.get_json("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise TimeoutError(f"Orthanc did not answer at {self.url} within {timeout:.0f} s"
                           + (f"; see {self.log_path}" if self.log_path else ""))

    def log_tail(self, n: int = 30) -> str:
        return tail_lines(self.log_path, n)

    def stop(self) -> None:
        stop_process_group(self.process, grace_s=20)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Orthanc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- REST -----------------------------------------------------------------------------------
    def request(self, path: str, data: bytes | None = None, method: str | None = None,
                headers: dict | None = None, timeout: float = 60.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def get_json(self, path: str):
        return json.loads(self.request(path, timeout=5.0))

    def upload(self, files: Iterable[str | os.PathLike]) -> list[str]:
        """POST each DICOM file to /instances; returns Orthanc instance ids."""
        ids = []
        for f in files:
            ans = json.loads(self.request("/instances", data=Path(f).read_bytes(), method="POST",
                                          headers={"Content-Type": "application/dicom"}))
            ids.append(ans["ID"])
        return ids

    def series(self, modality: str | None = None) -> list[dict]:
        """Expanded Orthanc series records (MainDicomTags, Instances), optionally of one modality."""
        out = self.get_json("/series?expand")
        if modality:
            out = [s for s in out if s.get("MainDicomTags", {}).get("Modality") == modality]
        return out

    def series_instance_uids(self, modality: str | None = None) -> list[str]:
        return sorted(s["MainDicomTags"]["SeriesInstanceUID"] for s in self.series(modality))


def upload_folder(orthanc: Orthanc, images_dir: str | os.PathLike, dicom_dir: str | os.PathLike, *,
                  cases: Sequence[str] | None = None, **kwargs) -> dict[str, str]:
    """Convert NIfTI cases to DICOM (in ``dicom_dir``) and upload them: case -> SeriesInstanceUID."""
    series = convert_folder(images_dir, dicom_dir, cases=cases, **kwargs)
    out = {}
    for case, files in series.items():
        orthanc.upload(files)
        out[case] = stable_uid(case, "series", str(kwargs.get("series_number", 1)))
    return out


# --------------------------------------------------------------------------------------------------
# Label maps -> DICOM-SEG (dcmqi), so a PACS can hold the few labelled cases too
# --------------------------------------------------------------------------------------------------

def dcmqi_tool(name: str = "itkimage2segimage") -> str | None:
    """Path of a dcmqi converter (PyPI package `dcmqi` ships them), or None."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import dcmqi

        cand = Path(dcmqi.__file__).parent / "bin" / name
        return str(cand) if cand.exists() else None
    except ImportError:
        return None


def label_to_dicom_seg(label: str | os.PathLike, series_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                       class_names: dict[int, str] | None = None, series_description: str = "final",
                       algorithm: str = "MANUAL") -> Path:
    """A NIfTI label map on the image grid -> one DICOM-SEG referencing the series in ``series_dir``."""
    exe = dcmqi_tool()
    if exe is None:
        raise FileNotFoundError("dcmqi's itkimage2segimage not found (pip install dcmqi)")
    label = Path(label)
    ids = sorted(int(v) for v in np.unique(np.asarray(nib.load(str(label)).dataobj)) if v > 0)
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
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta))
        tmp_out = Path(tmp) / "seg.dcm"
        res = subprocess.run([exe, "--inputImageList", str(label), "--inputDICOMDirectory", str(series_dir),
                              "--outputDICOM", str(tmp_out), "--inputMetadata", str(meta_path)],
                             capture_output=True, text=True)
        if res.returncode != 0 or not tmp_out.exists():
            raise InputError(label, f"itkimage2segimage failed ({res.returncode}): {res.stderr[-2000:] or res.stdout[-2000:]}")
        shutil.move(str(tmp_out), out_path)
    return out_path
