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
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from fastapi import HTTPException

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # whole string (fullmatch: "x\n" is no name)
# an absolute path (two or more components), not the path part of a URL
_ABS_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:)?(?:[/\\][^\s'\"`,;()\[\]{}<>/\\]+){2,}[/\\]?")


#: first components of the server's REST routes: "POST /train/ssl_nnunet" in a reason is advice, not a file
ROUTE_ROOTS = frozenset({"activelearning", "batch", "datastore", "infer", "info", "logs", "model", "ohif", "proxy",
                         "scoring", "session", "ssl_medsam2", "train", "wsi"})


def _scrubbed(match: re.Match) -> str:
    path = match.group(0)
    first = path[1:].split("/", 1)[0]
    if path.startswith("/") and first in ROUTE_ROOTS and not Path("/" + first).exists():
        return path  # a route of this server (no such folder here), kept word for word
    return Path(path.rstrip("/\\")).name or "<path>"


def public(text: str) -> str:
    """``text`` with every absolute path reduced to its last component (reasons shown to clients); the
    server's own routes (``/train/ssl_nnunet``) stay as they are."""
    return _ABS_PATH.sub(_scrubbed, str(text))


def reject(code: int, detail: str) -> HTTPException:
    return HTTPException(code, detail=public(detail))


def check_name(value: str | None, what: str) -> str:
    """``value`` if it is a plain name (letters, digits, ``.``, ``_``, ``-``; no ``..``), else 422."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise reject(422, f"{what} must be a plain name (letters, digits, '.', '_' or '-', not starting with "
                          f"'.' or '-', no '..', no '/'), got {value!r}")
    return value


MAX_PARAMS_CHARS = 1 << 20  # a request's JSON params: bigger is no parameter set, it is an attack
MAX_PARAMS_DEPTH = 32


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(value, limit: int) -> int:
    stack, deepest = [(value, 1)], 1
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def load_json(text: str, what: str = "params"):
    """Strict JSON: no NaN / Infinity / out-of-range numbers, no giant numbers, bounded size and depth;
    422 naming ``what`` otherwise (never a 500 or a reset connection)."""
    if len(text) > MAX_PARAMS_CHARS:
        raise reject(422, f"{what} is larger than {MAX_PARAMS_CHARS} characters")
    if text.count("[") + text.count("{") > MAX_PARAMS_DEPTH and _bracket_depth(text) > MAX_PARAMS_DEPTH:
        raise reject(422, f"{what} is nested deeper than {MAX_PARAMS_DEPTH} levels")
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise reject(422, f"{what} is not valid JSON: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # 5,000-digit integers, 1e400, NaN
        raise reject(422, f"{what} is not valid JSON: {str(exc)[:200]}") from exc


def _bracket_depth(text: str) -> int:
    """Nesting depth of ``[`` / ``{`` outside strings (checked before parsing: json recurses per level)."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_params(text: str | None, what: str = "params") -> dict:
    """The request's JSON params as a dict; 422 for invalid JSON or anything but an object."""
    value = load_json(text, what) if text else {}
    if not isinstance(value, dict):
        raise reject(422, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def check_body(value, what: str = "params") -> dict:
    """A JSON body FastAPI already parsed (``Optional[dict]``): an object of bounded depth, or 422."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise reject(422, f"{what} must be a JSON object, got {type(value).__name__}")
    if _depth(value, MAX_PARAMS_DEPTH) > MAX_PARAMS_DEPTH:
        raise reject(422, f"{what} is nested deeper than {MAX_PARAMS_DEPTH} levels")
    return value


CLIENT_ID = re.compile(r"[^\x00-\x1f\x7f]{1,100}")  # printable, at most 100 characters


def identity(params: dict, user, auth_enabled: bool, address: str = "") -> tuple[str, bool]:
    """(who is asking, anonymous?): the lease holder and the name recorded with a save.

    Auth on: the token's user name, body fields ignored. Auth off: the ``client_id`` the client sends
    (Slicer, the app's panel and ``MONAILabelClient(client_id=...)`` send one on every request; ``user``
    is read too), self-declared and so anonymous; a client that sends none is one holder per network
    address (``anonymous@<address>``), so its skips move its own lease instead of collecting new ones.
    A ``client_id`` with control characters or over 100 characters is 422.
    """
    if auth_enabled:  # a verified token: never the body, even when the token names nobody
        return str(getattr(user, "username", "") or getattr(user, "email", "") or "unnamed-token-user"), False
    for key in ("client_id", "user"):
        name = params.get(key)
        if name is None or name == "":
            continue
        if isinstance(name, bool) or not isinstance(name, (str, int)) or not CLIENT_ID.fullmatch(str(name)):
            raise reject(422, f"{key} must be a name of at most 100 characters without control "
                              f"characters, got {str(name)[:120]!r}")
        return str(name), True
    return f"anonymous@{address or 'unknown'}", True


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


def check_inside(folder: str | os.PathLike, path: str | os.PathLike | None, what: str) -> None:
    """409 unless ``path`` (and every link on the way to it) stays inside ``folder``.

    Why: a studies folder on a mounted share, or one an admin "helpfully" filled with links, must not
    let a delete or a save reach the link's target outside it (MONAI Label resolves links, then deletes
    or writes there; a link to a folder would be removed whole).
    """
    if not path:
        return
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise reject(409, f"{what} is a link that leaves the studies folder; the server will not write or "
                          f"delete through it (an admin can replace the link by the file)")
    if os.path.isdir(real) and os.path.islink(path):
        raise reject(409, f"{what} is a link to a folder; the server will not write or delete through it")


def clean_stale(scratch_root: Path, studies: str | os.PathLike | None, before: float) -> dict[str, int]:
    """At server start: remove what a killed server left behind (per-request scratch folders, and the
    temp files of interrupted atomic datastore writes), older than ``before`` (this process's start,
    so nothing this server is writing). Only the server process may call this: child processes start
    while the server's requests are in flight."""
    removed = {"scratch": 0, "datastore_temp": 0}

    def old(p: Path) -> bool:
        try:
            return p.lstat().st_mtime < before
        except OSError:
            return False

    if scratch_root.is_dir():
        for p in scratch_root.glob("req_*"):
            if old(p):
                shutil.rmtree(p, ignore_errors=True)
                removed["scratch"] += 1
    if studies and os.path.isdir(studies):
        for p in Path(studies).iterdir():
            n = p.name
            stale = (n.startswith(".datastore_v2.json.") and n != ".datastore_v2.json.last_good") \
                or n.startswith("..datastore_v2.json.last_good.")
            if stale and p.is_file() and not p.is_symlink() and old(p):
                p.unlink(missing_ok=True)
                removed["datastore_temp"] += 1
    return removed
