"""Per-image pseudo labels kept with what produced them, so a request that finds one answers at once.

Layout under the store's root::

    <engine>/<image>.nii.gz   the label (uint8, on the image's own grid)
    <engine>/<image>.json     its provenance: digest, supports used, computed_at, seconds, scores

The record is written after the label (both atomically), so a record always names a complete label.
A result is *current* when its ``digest`` equals the digest of what would produce it now
(:func:`producer_digest`: engine, settings, and the content of every final label), so a saved or removed
final label, or changed settings, makes every stored result not current without touching it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

from ..io import atomic_write, write_text_atomic

_fingerprints: dict[tuple[str, int, int], str] = {}
_fp_lock = threading.Lock()


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes, cached by (path, size, mtime): a re-saved label with new content changes it.
    A folder (a DICOM series as a DICOMweb datastore downloads it) is the SHA-1 of its files' names and
    fingerprints, in name order."""
    if os.path.isdir(path):
        h = hashlib.sha1()
        for root, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(f"{os.path.relpath(full, path)}:{file_fingerprint(full)};".encode())
        return h.hexdigest()
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _fp_lock:
        if key in _fingerprints:
            return _fingerprints[key]
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    with _fp_lock:
        _fingerprints[key] = h.hexdigest()
    return _fingerprints[key]


#: config sections a few-shot pseudo label depends on (the others: the app, serving, nnU-Net, the cluster)
PRODUCER_SECTIONS = ("input", "protocol", "sam2", "quality", "atlas")


def producer_settings(cfg: Mapping) -> dict:
    """The part of the config that can change a few-shot pseudo label."""
    return {k: cfg.get(k) for k in PRODUCER_SECTIONS}


def producer_digest(engine: str, settings: Mapping, supports: Mapping[str, str]) -> str:
    """What produces a pseudo label, as one short digest: the engine, its settings (any JSON-able mapping)
    and the supports (image id -> fingerprint of its final label, see :func:`file_fingerprint`)."""
    blob = json.dumps({"engine": engine, "settings": settings, "supports": dict(sorted(supports.items()))},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


class PseudoStore:
    """Stored pseudo labels per (engine, image), each with its provenance record."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def paths(self, engine: str, image_id: str) -> tuple[Path, Path]:
        folder = self.root / engine
        return folder / f"{image_id}.nii.gz", folder / f"{image_id}.json"

    def record(self, engine: str, image_id: str) -> dict | None:
        """The stored record (with ``path`` of its label), or None when there is none or its label is gone."""
        label, meta = self.paths(engine, image_id)
        try:
            rec = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not label.exists():
            return None
        return {**rec, "path": str(label)}

    def put(self, engine: str, image_id: str, write_label: Callable[[str], None], provenance: Mapping) -> dict:
        """Store a result: ``write_label(tmp_path)`` writes the label (a ``.nii.gz`` path), then the record."""
        label, meta = self.paths(engine, image_id)
        atomic_write(label, write_label)
        rec = {"image": image_id, "engine": engine, "computed_at": time.time(), **provenance}
        write_text_atomic(json.dumps(rec, indent=2, default=str), meta)
        return {**rec, "path": str(label)}

    def remove(self, engine: str, image_id: str) -> None:
        for p in reversed(self.paths(engine, image_id)):
            p.unlink(missing_ok=True)

    def clean_partial(self) -> int:
        """Remove temp files a killed writer left (``.<name>.*`` beside the results); returns how many."""
        n = 0
        for p in self.root.glob("*/.*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
        return n

    def engines(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []


def stored_pseudo_label(store_root: str | os.PathLike, image_id: str, engines: tuple[str, ...] = ()) -> dict | None:
    """The image's stored pseudo label (``path`` to a uint8 NIfTI on its grid, plus provenance: engine,
    digest, supports, computed_at), the newest over ``engines`` (default: every engine in the store); None
    when there is none. Whether it is current is the caller's question (compare ``digest``)."""
    store = PseudoStore(store_root)
    recs = [r for e in (engines or store.engines()) for r in [store.record(e, image_id)] if r]
    return max(recs, key=lambda r: r.get("computed_at", 0)) if recs else None
