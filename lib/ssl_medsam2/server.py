"""``ssl-medsam2 serve``: the MONAI Label app that ships with the package, started on a studies folder.

Why a copy: MONAI Label writes ``logs/``, ``model/`` and ``bin/`` into the app folder it serves, and an
installed package may be read-only or shared by several servers. So the app's files are copied to a
writable folder (per studies folder by default) and MONAI Label is started on that copy, as its own
process image (``exec``: signals such as Ctrl-C reach the server directly). Nothing here imports
MONAI Label: the library stays free of it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import yaml

from .config import PACKAGE_DIR, Section

#: what MONAI Label and Python write into an app folder; never copied, kept in the destination
_WRITTEN_BY_SERVER = ("logs", "model", "bin", "__pycache__", "*.pyc")


@dataclass(frozen=True)
class ServeSettings(Section):
    """The ``serve:`` section of the config, typed (what each key means: configs/ssl_medsam2.yaml)."""

    SECTION = "serve"
    host: str
    port: int
    app_dir: str | None

    def __post_init__(self):
        self._set(host=str(self.host), port=int(self.port))


#: a deployment's settings (deploy/Containerfile, docs/deploy.md): the studies folder or DICOMweb URL, a
#: mounted YAML of config sections, and single keys as SSL_MEDSAM2__SECTION__KEY=value
STUDIES_ENV = "SSL_MEDSAM2_STUDIES"
CONF_FILE_ENV = "SSL_MEDSAM2_CONF_FILE"
CONF_ENV_PREFIX = "SSL_MEDSAM2__"


def _conf_text(value) -> str:
    """A config value as ``--conf`` text (parsed back as YAML by the app; JSON is YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def site_conf(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The ``--conf`` pairs a deployment sets without a command line, in order: the YAML file named by
    ``SSL_MEDSAM2_CONF_FILE`` (``section: {key: value}``, as in configs/ssl_medsam2.yaml), then each
    ``SSL_MEDSAM2__SECTION__KEY=value`` (``section.key``; a later pair wins, and the command line's own
    ``--conf`` come after these). Why: a container is configured by its environment or a mounted file."""
    pairs: list[tuple[str, str]] = []
    path = environ.get(CONF_FILE_ENV)
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, Mapping) or not all(isinstance(v, Mapping) for v in data.values()):
            raise ValueError(f"{CONF_FILE_ENV}={path}: expected config sections (section: {{key: value}})")
        pairs += [(f"{section}.{key}", _conf_text(value)) for section, keys in data.items()
                  for key, value in keys.items()]
    pairs += [(name[len(CONF_ENV_PREFIX):].lower().replace("__", "."), environ[name])
              for name in sorted(environ) if name.startswith(CONF_ENV_PREFIX) and name != CONF_ENV_PREFIX]
    return pairs


def app_source_dir() -> Path:
    """The MONAI Label app's files: inside an installed wheel (``ssl_medsam2/app``), else the source
    tree's ``apps/ssl_medsam2`` (a checkout on ``PYTHONPATH`` or an editable install)."""
    for cand in (PACKAGE_DIR / "app", PACKAGE_DIR.parents[1] / "apps" / "ssl_medsam2"):
        if (cand / "main.py").is_file():
            return cand
    raise FileNotFoundError("the MONAI Label app (ssl_medsam2/app or apps/ssl_medsam2) is not installed with "
                            "this package")


def is_url(studies: str) -> bool:
    return "://" in str(studies)


def default_app_dir(studies: str) -> Path:
    """``<studies>/.ssl_medsam2/app``: beside the app's default state folder, one per studies folder."""
    if is_url(studies):
        raise ValueError("a DICOMweb studies URL needs --app-dir (a writable folder for the app's files)")
    return Path(studies) / ".ssl_medsam2" / "app"


def prepare_app_dir(dest: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Copy the app's files into ``dest`` (created; files the server wrote there are kept)."""
    source, dest = Path(source or app_source_dir()), Path(dest)
    if dest.resolve() == source.resolve():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*_WRITTEN_BY_SERVER))
    return dest


def start_server_argv(app_dir: str | os.PathLike, studies: str, host: str, port: int,
                      conf: Iterable[Sequence[str]] = ()) -> list[str]:
    """The MONAI Label command line that serves ``app_dir`` on ``studies``."""
    argv = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies),
            "--host", host, "--port", str(port)]
    for key, value in conf:
        argv += ["--conf", key, value]
    return argv


def serve(studies: str, settings: ServeSettings, conf: Iterable[Sequence[str]] = ()) -> None:
    """Copy the app next to ``studies`` (or to ``settings.app_dir``) and become its MONAI Label server."""
    if not is_url(studies) and not Path(studies).is_dir():
        raise FileNotFoundError(f"studies folder {studies} does not exist (ssl-medsam2 make-studies makes one)")
    app_dir = prepare_app_dir(settings.app_dir or default_app_dir(studies))
    argv = start_server_argv(app_dir, studies, settings.host, settings.port, conf)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
