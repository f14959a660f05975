"""What a DICOMweb proxy in front of a PACS needs: STOW bodies split into DICOM objects, the request
headers a PACS may see, and answers that do not give out the PACS's address.

Why: a viewer (OHIF) reaches the PACS only through the app; the app must see what is stored (a STOW
body is ``multipart/related; type="application/dicom"``), must not hand the user's token or cookies to
another server, and must not teach browsers an internal address they then bypass the app with.
"""

from __future__ import annotations

import re
from typing import Mapping

from .io import InputError

#: request headers a PACS needs to answer a read: content negotiation and byte ranges, nothing else
READ_HEADERS = ("accept", "accept-encoding", "range", "if-none-match", "if-modified-since")
#: answer headers passed back to the client (lengths and encodings are the proxy's own)
ANSWER_HEADERS = ("content-type", "etag", "last-modified", "cache-control", "content-range", "accept-ranges")
MAX_STOW_PARTS = 16
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_PART_TYPE = re.compile(rb"^content-type:\s*([^\r\n;]+)", re.IGNORECASE | re.MULTILINE)


def pacs_headers(incoming: Mapping[str, str], forward_token: bool = False) -> dict[str, str]:
    """The subset of a client's request headers that goes on to the PACS: content negotiation only,
    plus ``Authorization`` when the PACS is configured to take the user's own token."""
    out = {k: v for k, v in incoming.items() if k.lower() in READ_HEADERS}
    if forward_token:
        out.update({k: v for k, v in incoming.items() if k.lower() == "authorization"})
    return out


def answer_headers(pacs: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in pacs.items() if k.lower() in ANSWER_HEADERS}


_ABSOLUTE_DICOMWEB_URL = re.compile(rb'"https?:(?:\\?/){2}[^"\s]*?((?:\\?/)studies(?:\\?/|"))')


def hide_address(body: bytes, pacs_root: str, public_root: str) -> bytes:
    """A JSON / XML answer of the PACS with its DICOMweb root replaced by the proxy's public root: the
    configured root (``http://10.0.0.5:8042/dicom-web``), and any absolute URL up to its ``/studies/``
    (RetrieveURL, BulkDataURI: the PACS may name itself by another host than the one configured)."""
    public = public_root.rstrip("/")
    for old, new in ((pacs_root.rstrip("/"), public), (pacs_root.rstrip("/").replace("/", "\\/"),
                                                      public.replace("/", "\\/"))):
        body = body.replace(old.encode(), new.encode())
    return _ABSOLUTE_DICOMWEB_URL.sub(lambda m: b'"' + public.encode() + m.group(1), body)


def stow_objects(body: bytes, content_type: str, shown_name: str = "STOW request") -> list[bytes]:
    """The DICOM objects of a STOW-RS body: ``multipart/related`` parts of type ``application/dicom``
    (or one bare ``application/dicom`` body); InputError for anything else (JSON / XML metadata with
    bulk data, other part types, no objects, more than ``MAX_STOW_PARTS``)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/dicom":
        return [body]
    if media != "multipart/related":
        raise InputError(shown_name, f"a STOW body is multipart/related; type=\"application/dicom\" (got "
                                     f"'{media or 'no content type'}')")
    m = _BOUNDARY.search(content_type)
    if not m:
        raise InputError(shown_name, "multipart/related without a boundary")
    delimiter = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise InputError(shown_name, "a multipart part without headers")
        ptype = _PART_TYPE.search(head)
        kind = ptype.group(1).strip().lower().decode(errors="replace") if ptype else "no content type"
        if kind != "application/dicom":
            raise InputError(shown_name, f"only application/dicom parts are stored here (got '{kind}')")
        parts.append(data[:-2] if data.endswith(b"\r\n") else data)
        if len(parts) > MAX_STOW_PARTS:
            raise InputError(shown_name, f"more than {MAX_STOW_PARTS} objects in one STOW request")
    if not parts:
        raise InputError(shown_name, "the STOW body holds no DICOM object")
    return parts
