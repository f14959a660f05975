"""A local Orthanc PACS (process + REST client) and the process helpers the demo and tests share.

Why: radiology teams keep images in a PACS and MONAI Label's OHIF viewer only reads DICOMweb; a
loopback Orthanc with its storage in a work folder lets OHIF / 3D Slicer be tried on real images
(``scripts/orthanc.py``, ``scripts/pacs_demo.py``) and lets the tests run the DICOMweb path for real.
Needs the Debian packages ``orthanc orthanc-dicomweb``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .config import CONFIG_DIR
from .dicom import convert_folder, stable_uid

logger = logging.getLogger(__name__)

DEFAULT_ORTHANC_CONFIG = CONFIG_DIR / "orthanc" / "orthanc.json"


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


def upload_folder(orthanc: Orthanc, images_dir: str | os.PathLike, dicom_dir: str | os.PathLike, *,
                  cases: Sequence[str] | None = None, **kwargs) -> dict[str, str]:
    """Convert NIfTI cases to DICOM (in ``dicom_dir``) and upload them: case -> SeriesInstanceUID."""
    series = convert_folder(images_dir, dicom_dir, cases=cases, **kwargs)
    out = {}
    for case, files in series.items():
        orthanc.upload(files)
        out[case] = stable_uid(case, "series", str(kwargs.get("series_number", 1)))
    return out
