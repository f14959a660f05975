"""What every route checks before it touches the datastore: names, JSON params, who is asking, file sizes.

Why: a shared server must never be steered by the request into paths, other people's identities or
unbounded work. Ids are names (``chaos_03``, a DICOM UID), never paths; params are a JSON object;
identity comes from the verified token when auth is on (body fields ``user`` / ``client_id`` only
name clients when auth is off, and such clients are *anonymous*); an uploaded file is received into
a per-request scratch folder that is removed when the request ends, whatever its outcome; a refusal
is a 4xx whose reason names no server path.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from fastapi import HTTPException

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# an absolute path (two or more components), not the path part of a URL
_ABS_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:)?(?:[/\\][^\s'\"`,;()\[\]{}<>/\\]+){2,}[/\\]?")


def public(text: str) -> str:
    """``text`` with every absolute path reduced to its last component (reasons shown to clients)."""
    return _ABS_PATH.sub(lambda m: Path(m.group(0).rstrip("/\\")).name or "<path>", str(text))


def reject(code: int, detail: str) -> HTTPException:
    return HTTPException(code, detail=public(detail))


def check_name(value: str | None, what: str) -> str:
    """``value`` if it is a plain name (letters, digits, ``.``, ``_``, ``-``; no ``..``), else 422."""
    if not isinstance(value, str) or not NAME.match(value) or ".." in value:
        raise reject(422, f"{what} must be a plain name (letters, digits, '.', '_' or '-', not starting with "
                          f"'.' or '-', no '..', no '/'), got {value!r}")
    return value


def parse_params(text: str | None, what: str = "params") -> dict:
    """The request's JSON params as a dict; 422 for invalid JSON or anything but an object."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise reject(422, f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise reject(422, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def identity(params: dict, user, auth_enabled: bool) -> tuple[str, bool]:
    """(who is asking, anonymous?). Auth on: the token's user name, body fields ignored. Auth off: the
    body's ``client_id`` / ``user`` (self-declared, so anonymous), else ``anonymous-<random>``: a
    holder of its own for this request, since OHIF sends no client_id and one shared name would make
    every annotator renew the same lease and get the same image (still capped by app.anonymous_leases)."""
    if auth_enabled:  # a verified token: never the body, even when the token names nobody
        return str(getattr(user, "username", "") or getattr(user, "email", "") or "unnamed-token-user"), False
    name = params.get("client_id") or params.get("user")
    if isinstance(name, (str, int)) and str(name):
        return str(name)[:100], True
    return f"anonymous-{uuid.uuid4().hex[:8]}", True


@contextlib.contextmanager
def scratch(root: Path) -> Iterator[Path]:
    """A private folder for one request's temporary files, removed when the request ends."""
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="req_", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def receive(upload, folder: Path, name: str, max_bytes: int) -> Path:
    """Copy an uploaded file into ``folder`` (413 once it exceeds ``max_bytes``, nothing kept)."""
    dest = folder / name
    size = 0
    with open(dest, "wb") as fh:
        while True:
            chunk = upload.file.read(1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                fh.close()
                dest.unlink(missing_ok=True)
                raise reject(413, f"{upload.filename or 'upload'}: larger than the server's limit of "
                                  f"{max_bytes // (1 << 20)} MB (app.max_upload_mb)")
            fh.write(chunk)
    upload.file.seek(0)
    return dest
