#!/usr/bin/env python
"""One command for the PACS path: Orthanc (with the cases) + the SSL-MedSAM2 MONAI Label app on DICOMweb.

    python scripts/pacs_demo.py --work-dir work_dirs/pacs \\
        --images ../shared/data/chaos_t2spir/imagesTr --labels ../shared/data/chaos_t2spir/labelsTr \\
        --label-cases chaos_01 chaos_02 --modality MR
    # then open http://127.0.0.1:8000/ohif/ (OHIF) or point 3D Slicer's MONAI Label module at
    # http://127.0.0.1:8000 ; Ctrl-C stops both servers.

Everything the servers write (Orthanc storage, MONAI Label's DICOMweb cache, the app state) goes under
``--work-dir``. ``--conf KEY VALUE`` is passed to the app (e.g. ``--conf sam2.checkpoint /path.pt``).
The helpers (:func:`start_monailabel`) are also used by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "ssl_medsam2"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ssl_medsam2 import pacs  # noqa: E402


@dataclass
class MonaiLabelServer:
    """A ``monailabel start_server`` child process on 127.0.0.1 (stop() ends it and its children)."""

    url: str
    process: subprocess.Popen
    log_path: Path
    _log: object = field(default=None, repr=False)

    def log_tail(self, n: int = 60) -> str:
        return pacs.tail_lines(self.log_path, n)

    def stop(self) -> None:
        pacs.stop_process_group(self.process, grace_s=30)
        if self._log is not None:
            self._log.close()
            self._log = None


def start_monailabel(studies: str, work_dir: str | os.PathLike, *, port: int | None = None,
                     conf: dict | None = None, env: dict | None = None, app_dir: Path = APP_DIR,
                     timeout: float = 240.0) -> MonaiLabelServer:
    """Start the app on ``studies`` (a folder or a DICOMweb URL); state and caches live in ``work_dir``."""
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    port = port or pacs.free_port()
    conf = {"app.state_dir": str(work_dir / "state"), **(conf or {})}
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    for k, v in conf.items():
        cmd += ["--conf", str(k), str(v)]
    full_env = {**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
                "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work_dir / "dicomweb_cache"),
                "MONAI_LABEL_SESSION_PATH": str(work_dir / "sessions"), **(env or {})}
    log_path = work_dir / "monailabel.log"
    log = open(log_path, "ab")
    # cwd = work_dir: MONAI Label also reads a .env file from its working directory
    proc = subprocess.Popen(cmd, cwd=work_dir, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = MonaiLabelServer(f"http://127.0.0.1:{port}", proc, log_path, log)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"MONAI Label exited ({proc.returncode}):\n{server.log_tail()}")
        if time.time() > deadline:
            server.stop()
            raise TimeoutError(f"MONAI Label not ready in {timeout:.0f} s:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/ohif/", timeout=3) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--images", help="NIfTI images to upload (skip to serve what Orthanc already holds)")
    ap.add_argument("--labels", help="label maps, uploaded as DICOM-SEG (MONAI Label's 'final' labels)")
    ap.add_argument("--cases", nargs="*")
    ap.add_argument("--label-cases", nargs="*")
    ap.add_argument("--modality", default="MR", help="series MONAI Label lists (DICOMweb search filter)")
    ap.add_argument("--orthanc-port", type=int, default=8042)
    ap.add_argument("--port", type=int, default=8000, help="MONAI Label port")
    ap.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = ap.parse_args(argv)

    from orthanc import upload

    work = Path(args.work_dir).resolve()
    orthanc = pacs.Orthanc.start(work / "orthanc", args.orthanc_port)
    server = None
    try:
        if args.images:
            with tempfile.TemporaryDirectory() as tmp:
                res = upload(orthanc, args.images, args.labels, Path(tmp), args.cases, args.label_cases)
            print(json.dumps({"uploaded": len(res["series"]), "labels": res["segs"]}), flush=True)
        server = start_monailabel(orthanc.dicomweb_url, work / "monailabel", port=args.port, conf=dict(args.conf),
                                  env={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": args.modality})})
        print(f"Orthanc {orthanc.url}  |  MONAI Label {server.url}  |  OHIF {server.url}/ohif/  (Ctrl-C stops)",
              flush=True)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        while server.process.poll() is None and orthanc.process.poll() is None:
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


if __name__ == "__main__":
    sys.exit(main())
