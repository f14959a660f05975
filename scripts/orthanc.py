#!/usr/bin/env python
"""A local Orthanc PACS holding NIfTI cases as DICOM, for OHIF / 3D Slicer / MONAI Label DICOMweb mode.

    # start Orthanc (loopback only, DICOMweb on, storage in the work dir), upload CHAOS, keep serving
    python scripts/orthanc.py serve --work-dir work_dirs/orthanc --port 8042 \\
        --images ../shared/data/chaos_t2spir/imagesTr --labels ../shared/data/chaos_t2spir/labelsTr \\
        --label-cases chaos_01 chaos_02

    # upload into an Orthanc that is already running
    python scripts/orthanc.py upload --url http://127.0.0.1:8042 --images DIR [--labels DIR]

    # only convert NIfTI -> DICOM series (one folder per case)
    python scripts/orthanc.py convert --images DIR --out DIR

Labels (``--labels``) are uploaded as DICOM-SEG (dcmqi) referencing their image series, which is how
MONAI Label's DICOMweb datastore recognises a labelled image; by default every case with a label
file is uploaded with it; ``--label-cases`` restricts that to a few.
The thin shell over :mod:`ssl_medsam2.dicom`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

from ssl_medsam2 import dicom, dicom_seg, pacs
from ssl_medsam2.config import load_config
from ssl_medsam2.io import InputError, list_volumes


def _class_names() -> dict[int, str]:
    try:
        return {int(k): str(v) for k, v in (load_config()["input"].get("class_names") or {}).items()}
    except Exception:  # config is optional for this script
        return {}


def upload(server: pacs.Orthanc, images: str, labels: str | None, dicom_dir: Path,
           cases: list[str] | None, label_cases: list[str] | None) -> dict:
    series = pacs.upload_folder(server, images, dicom_dir, cases=cases)
    segs = {}
    if labels:
        lab = list_volumes(labels)
        names = _class_names()
        for case in (label_cases or sorted(series)):
            if case not in series:
                raise InputError(images, f"label case '{case}' has no image")
            if case not in lab:
                if label_cases:
                    raise InputError(labels, f"no label file for case '{case}'")
                continue
            seg = dicom_seg.label_to_dicom_seg(lab[case], dicom_dir / case, dicom_dir / f"{case}_seg.dcm",
                                           class_names=names)
            server.upload([seg])
            segs[case] = str(seg)
    return {"series": series, "segs": sorted(segs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="start Orthanc, optionally upload NIfTI cases, serve until Ctrl-C")
    s.add_argument("--work-dir", required=True, help="Orthanc storage, runtime config and log go here")
    s.add_argument("--port", type=int, default=8042)
    u = sub.add_parser("upload", help="convert and upload NIfTI cases to a running Orthanc")
    u.add_argument("--url", default="http://127.0.0.1:8042")
    for p in (s, u):
        p.add_argument("--images", required=p is u, help="folder of NIfTI images (nnU-Net names work)")
        p.add_argument("--labels", help="folder of label maps: uploaded as DICOM-SEG")
        p.add_argument("--cases", nargs="*", help="only these cases")
        p.add_argument("--label-cases", nargs="*", help="upload labels only for these cases")
        p.add_argument("--dicom-dir", help="where the DICOM files are written (default: a temp dir)")
    c = sub.add_parser("convert", help="NIfTI -> DICOM series, one folder per case")
    c.add_argument("--images", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--cases", nargs="*")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")

    try:
        if args.cmd == "convert":
            out = dicom.convert_folder(args.images, args.out, cases=args.cases)
            print(json.dumps({case: len(files) for case, files in out.items()}))
            return 0
        server = (pacs.Orthanc.start(args.work_dir, args.port) if args.cmd == "serve"
                  else pacs.Orthanc.connect(args.url))
        try:
            if args.images:
                with tempfile.TemporaryDirectory() as tmp:
                    ddir = Path(args.dicom_dir) if args.dicom_dir else Path(tmp)
                    res = upload(server, args.images, args.labels, ddir, args.cases, args.label_cases)
                print(json.dumps({"uploaded": len(res["series"]), "labels": res["segs"]}))
            if args.cmd == "serve":
                print(f"Orthanc: {server.url}   DICOMweb: {server.dicomweb_url}   (Ctrl-C stops)", flush=True)
                signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
                while server.process.poll() is None:
                    time.sleep(1)
                print(server.log_tail(), file=sys.stderr)
                return 1
        finally:
            if args.cmd == "serve":
                server.stop()
    except (InputError, FileNotFoundError, TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
