#!/usr/bin/env python
"""Benchmark of the PACS path on real CHAOS data: NIfTI -> DICOM, upload to Orthanc, DICOMweb listing,
DICOM-SEG of the labels, and the geometry of the NIfTI -> DICOM -> NIfTI round trip.

    python bench/pacs_speed.py [--data ../shared/data/chaos_t2spir] [--work-dir /tmp/bench_pacs]

Prints one line per case, then a JSON summary as its LAST line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ssl_medsam2 import dicom, dicom_seg, pacs
from ssl_medsam2.io import list_volumes, load_volume
from shared_data import CHAOS, work_folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(CHAOS))
    ap.add_argument("--work-dir", default=None, help="default: a temp dir, removed afterwards")
    args = ap.parse_args(argv)
    data = Path(args.data)
    images, labels = list_volumes(data / "imagesTr"), list_volumes(data / "labelsTr")
    res = {"cases": len(images), "convert_s": 0.0, "upload_s": 0.0, "seg_s": 0.0, "slices": 0,
           "roundtrip_max_abs_intensity_err": 0.0, "roundtrip_max_affine_err_mm": 0.0}
    with work_folder(args.work_dir, "pacs_speed_") as work:
        orthanc = pacs.Orthanc.start(work / "orthanc") if pacs.orthanc_binary() else None
        try:
            for case, path in images.items():
                t = time.perf_counter()
                files = dicom.nifti_to_dicom_series(path, work / "dicom" / case, case=case)
                conv = time.perf_counter() - t
                back = dicom.dicom_series_to_nifti(work / "dicom" / case, work / "back" / f"{case}.nii.gz")
                a, b = load_volume(path), load_volume(back)
                ierr = float(np.abs(a.array - b.array).max()) if a.shape == b.shape else float("inf")
                aerr = float(np.abs(a.affine - b.affine).max())
                res["convert_s"] += conv
                res["slices"] += len(files)
                res["roundtrip_max_abs_intensity_err"] = max(res["roundtrip_max_abs_intensity_err"], ierr)
                res["roundtrip_max_affine_err_mm"] = max(res["roundtrip_max_affine_err_mm"], aerr)
                line = {"case": case, "slices": len(files), "convert_s": round(conv, 3), "intensity_err": ierr,
                        "affine_err_mm": round(aerr, 6)}
                if orthanc is not None:
                    t = time.perf_counter()
                    orthanc.upload(files)
                    line["upload_s"] = round(time.perf_counter() - t, 3)
                    res["upload_s"] += line["upload_s"]
                    if case in labels and dicom_seg.dcmqi_tool():
                        t = time.perf_counter()
                        seg = dicom_seg.label_to_dicom_seg(labels[case], work / "dicom" / case,
                                                           work / "seg" / f"{case}.dcm")
                        orthanc.upload([seg])
                        line["seg_s"] = round(time.perf_counter() - t, 3)
                        res["seg_s"] += line["seg_s"]
                print(json.dumps(line), flush=True)
            if orthanc is not None:
                t = time.perf_counter()
                listed = json.loads(orthanc.request("/dicom-web/series?Modality=MR"))
                res["qido_series_s"] = round(time.perf_counter() - t, 4)
                res["qido_series_listed"] = len(listed)
                res["segs_listed"] = len(json.loads(orthanc.request("/dicom-web/series?Modality=SEG")))
        finally:
            if orthanc is not None:
                orthanc.stop()
    for k in ("convert_s", "upload_s", "seg_s"):
        res[k] = round(res[k], 3)
    res["convert_ms_per_slice"] = round(1000 * res["convert_s"] / max(1, res["slices"]), 2)
    res["orthanc"] = orthanc is not None
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
