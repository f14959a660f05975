"""MONAI Label DICOMweb mode (Orthanc, any PACS) made usable offline and without stale state.

Why:
- MONAI Label downloads dcmqi from GitHub at start unless ``itkimage2segimage`` is on PATH; the PyPI
  wheel ``dcmqi`` ships it, so we put that wheel's ``bin`` on PATH (offline start, DICOM-SEG works).
- ``DICOMWebDatastore.list_images`` / ``get_labeled_images`` are cached for
  ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` seconds (default 7200): after a label is saved as DICOM-SEG
  the image would still be listed as unlabelled (and handed out again) for up to two hours. We
  clear those caches after every save and every image upload, so the state updates at once.
- A local datastore finds an image's final label by the image id; the DICOMweb one wants the
  DICOM-SEG series id (asked with an image id it downloads the image series and fails to read it as
  a SEG). ``get_label_uri(image_id, "final")`` now looks up the SEG series that references the image.
- ``dicom_to_nifti(seg, is_seg=True)`` writes ``.seg.nrrd``; the app reads NIfTI (geometry-checked
  through ``ssl_medsam2.io``), so DICOM-SEG labels are converted to ``.nii.gz`` instead.

Hook: ``import dicomweb`` at the top of the app's ``main.py`` (idempotent, every process).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
_installed = False


def dcmqi_bin() -> Path | None:
    try:
        import dcmqi
    except ImportError:
        return None
    path = Path(dcmqi.__file__).resolve().parent / "bin"
    return path if (path / "itkimage2segimage").exists() else None


def clear_listing_caches() -> None:
    """Forget the cached image list and labelled set of every DICOMweb datastore in this process."""
    from monailabel.datastore.dicom import DICOMWebDatastore

    for name in ("list_images", "get_labeled_images"):
        fn = getattr(DICOMWebDatastore, name)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
        elif hasattr(fn, "cache"):
            fn.cache.clear()
    _seg_cache.clear()


_seg_cache: dict = {}


def seg_series_by_image(ds) -> dict[str, str]:
    """Image SeriesInstanceUID -> the newest DICOM-SEG series referencing it (what 'final' means in a PACS)."""
    key = id(ds)
    if key in _seg_cache:
        return _seg_cache[key]
    from pydicom import Dataset

    out: dict[str, tuple[str, str]] = {}
    for item in ds._client.search_for_series(search_filters={"Modality": "SEG"}):
        seg = Dataset.from_json(item)
        meta = Dataset.from_json(ds._client.retrieve_series_metadata(str(seg.StudyInstanceUID),
                                                                     str(seg.SeriesInstanceUID))[0])
        refs = meta.get("ReferencedSeriesSequence")
        if refs:
            ref = str(refs[0].SeriesInstanceUID)
            stamp = f"{meta.get('SeriesDate', '')}{meta.get('SeriesTime', '')}{meta.get('ContentDate', '')}" \
                    f"{meta.get('ContentTime', '')}"
            if ref not in out or stamp >= out[ref][1]:
                out[ref] = (str(seg.SeriesInstanceUID), stamp)
    _seg_cache[key] = {k: v[0] for k, v in out.items()}
    return _seg_cache[key]


def install() -> None:
    global _installed
    if _installed:
        return
    bin_dir = dcmqi_bin()
    if bin_dir is not None and str(bin_dir) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = str(bin_dir) + os.pathsep + os.environ.get("PATH", "")
    from monailabel.datastore.dicom import DICOMWebDatastore

    def fresh_after(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            finally:
                clear_listing_caches()

        wrapper._ssl_medsam2_fresh = True
        return wrapper

    from monailabel.datastore.utils import convert

    if not getattr(convert.dicom_seg_to_itk_image, "_ssl_medsam2_nifti", False):
        seg_to_image = convert.dicom_seg_to_itk_image

        @functools.wraps(seg_to_image)
        def dicom_seg_to_nifti(label, output_ext=".nii.gz"):
            return seg_to_image(label, output_ext=output_ext)

        dicom_seg_to_nifti._ssl_medsam2_nifti = True
        convert.dicom_seg_to_itk_image = dicom_seg_to_nifti

    original_get_label_uri = DICOMWebDatastore.get_label_uri
    if not getattr(original_get_label_uri, "_ssl_medsam2_by_image", False):
        @functools.wraps(original_get_label_uri)
        def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
            if label_tag == "final" and not image_id and label_id in set(self.list_images()):
                seg = seg_series_by_image(self).get(label_id)
                if seg is None:
                    return ""
                self.get_image_uri(label_id)  # the local index must know the image before its label
                return original_get_label_uri(self, seg, label_tag, image_id=label_id)
            return original_get_label_uri(self, label_id, label_tag, image_id)

        get_label_uri._ssl_medsam2_by_image = True
        DICOMWebDatastore.get_label_uri = get_label_uri

    for name in ("save_label", "add_image", "remove_image", "remove_label"):
        method = getattr(DICOMWebDatastore, name, None)
        if method is not None and not getattr(method, "_ssl_medsam2_fresh", False):
            setattr(DICOMWebDatastore, name, fresh_after(method))
    _installed = True
    logger.info("ssl_medsam2 dicomweb: dcmqi %s; listing caches cleared after saves", bin_dir or "NOT found")


install()
