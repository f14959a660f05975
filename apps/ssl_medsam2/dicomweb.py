"""MONAI Label DICOMweb mode (Orthanc, any PACS) made usable offline and without stale state.

Why:
- MONAI Label downloads dcmqi from GitHub at start unless ``itkimage2segimage`` is on PATH; the PyPI
  wheel ``dcmqi`` ships it, so we put that wheel's ``bin`` on PATH (offline start, DICOM-SEG works).
- ``DICOMWebDatastore.list_images`` / ``get_labeled_images`` are cached for
  ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` seconds (default 7200): after a label is saved as DICOM-SEG
  the image would still be listed as unlabelled (and handed out again) for up to two hours. We
  clear those caches after every save and every image upload, so the state updates at once.

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

    for name in ("save_label", "add_image", "remove_image", "remove_label"):
        method = getattr(DICOMWebDatastore, name, None)
        if method is not None and not getattr(method, "_ssl_medsam2_fresh", False):
            setattr(DICOMWebDatastore, name, fresh_after(method))
    _installed = True
    logger.info("ssl_medsam2 dicomweb: dcmqi %s; listing caches cleared after saves", bin_dir or "NOT found")


install()
