"""Everything the app's tasks share: the merged config, the state folder, the datastore and the model registry.

MONAI Label rebuilds the whole app in every training / scoring / batch-infer child process, so nothing
here loads a model: it only resolves paths and reads small JSON files. State that both the server and
its child processes must agree on (model versions, leases, train progress) lives in files under
``app.state_dir`` (default ``<studies>/.ssl_medsam2``), written atomically and guarded by file locks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from filelock import FileLock

from ssl_medsam2.config import Section, load_config, merge
from ssl_medsam2.io import write_text_atomic
from ssl_medsam2.leases import LeaseBook
from ssl_medsam2.nnunet.layout import Under

log = logging.getLogger(__name__)

FINAL_TAG = "final"


def project_config(conf: Mapping[str, Any] | None) -> dict:
    """The project config with MONAI Label ``--conf`` pairs applied.

    Every dotted key (``sam2.checkpoint``, ``nnunet.epochs``, ``app.lease_hours``) overrides the project
    config strictly (a typo fails at start, naming the key); plain keys belong to MONAI Label itself.
    Values are parsed as YAML, like ``--set`` on the CLI.
    """
    items = [f"{k}={v}" for k, v in (conf or {}).items() if "." in str(k)]
    return merge(load_config(), items, strict=True, where="MONAI Label --conf")


class ModelRegistry:
    """Trained nnU-Net versions and which one is deployed (``versions.json``), with promotion and rollback."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "versions.json"
        self._lock = FileLock(str(self.path) + ".lock")

    def _read(self) -> dict:
        if not self.path.exists():
            return {"current": None, "versions": []}
        return json.loads(self.path.read_text())

    def _write(self, data: dict) -> None:
        write_text_atomic(json.dumps(data, indent=2), self.path)

    def state(self) -> dict:
        with self._lock:
            return self._read()

    def current(self) -> dict | None:
        data = self.state()
        for v in data["versions"]:
            if v["id"] == data.get("current"):
                return v
        return None

    def current_model_dir(self) -> str | None:
        cur = self.current()
        return cur["model_dir"] if cur and Path(cur["model_dir"]).is_dir() else None

    def next_id(self) -> str:
        with self._lock:
            data = self._read()
            n = 1 + max([int(v["id"][1:]) for v in data["versions"]] + [0])
            # reserve the folder so two concurrent trainings never share it
            while (self.root / f"v{n:03d}").exists():
                n += 1
            (self.root / f"v{n:03d}").mkdir(parents=True)
            return f"v{n:03d}"

    def add(self, entry: dict, promote: bool) -> dict:
        with self._lock:
            data = self._read()
            entry = dict(entry, promoted=bool(promote), created=entry.get("created", time.time()))
            data["versions"] = [v for v in data["versions"] if v["id"] != entry["id"]] + [entry]
            if promote:
                data["current"] = entry["id"]
                data.setdefault("history", []).append({"current": entry["id"], "ts": time.time(), "why": "promoted"})
            self._write(data)
            return data

    def set_current(self, version: str | None = None, why: str = "rollback") -> dict:
        """Deploy ``version`` (default: the version deployed before the current one)."""
        with self._lock:
            data = self._read()
            ids = [v["id"] for v in data["versions"]]
            if version is None:
                hist = [h["current"] for h in data.get("history", [])]
                prev = [h for h in hist[:-1] if h != data.get("current")]
                if not prev:
                    raise KeyError("no earlier deployed version to roll back to")
                version = prev[-1]
            if version not in ids:
                raise KeyError(f"unknown model version '{version}' (known: {', '.join(ids) or 'none'})")
            data["current"] = version
            data.setdefault("history", []).append({"current": version, "ts": time.time(), "why": why})
            self._write(data)
            return data


@dataclass(frozen=True)
class AppSettings(Section):
    """The ``app:`` section of the config, typed (what each key means: configs/ssl_medsam2.yaml)."""

    SECTION = "app"
    state_dir: str | None
    lease_hours: float
    pseudo_tag: str
    fewshot_top_k: int
    retrain_after_labels: int
    retrain_debounce_s: float
    promote_tolerance: float
    promote_eval_cases: int
    auto_update_scoring: bool
    embedding_grid: tuple
    anonymous_leases: int
    max_upload_voxels: int
    max_upload_mb: float

    def __post_init__(self):
        for name, kind in (("lease_hours", float), ("pseudo_tag", str), ("fewshot_top_k", int),
                           ("retrain_after_labels", int), ("retrain_debounce_s", float), ("promote_tolerance", float),
                           ("promote_eval_cases", int), ("auto_update_scoring", bool), ("embedding_grid", tuple),
                           ("anonymous_leases", int), ("max_upload_voxels", int), ("max_upload_mb", float)):
            self._set(**{name: kind(getattr(self, name))})


class Workspace:
    """Config, folders and shared file-backed state of one app instance (server or child process)."""

    def __init__(self, app_dir: str, studies: str, conf: Mapping[str, Any] | None, datastore=None):
        self.app_dir = Path(app_dir)
        self.studies = studies
        self.conf = dict(conf or {})
        self.cfg = project_config(conf)
        if not str(studies).startswith(("http://", "https://")):  # class names from the studies' dataset.json
            from ssl_medsam2.preprocess import with_dataset_class_names

            self.cfg = with_dataset_class_names(self.cfg, Path(studies))
        self.app = AppSettings.from_config(self.cfg)
        state = self.app.state_dir
        if not state:
            if str(studies).startswith(("http://", "https://")):
                state = self.app_dir / "state"  # remote datastore: keep state beside the app
            else:
                state = Path(studies) / ".ssl_medsam2"
        self.state_dir = Path(os.path.expanduser(str(state))).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.datastore = datastore
        if datastore is not None and self.dicomweb:  # how the PACS's SEGs are read onto their images' grids
            from ssl_medsam2.preprocess import InputSettings

            from ssl_medsam2.dicom_seg import segment_label_ids

            inputs = InputSettings.from_config(self.cfg)  # the configured set only: the found one is read through this
            datastore.ssl_medsam2_segment_ids = \
                lambda segs, name: segment_label_ids(segs, inputs.class_names, inputs.label_ids, name, reading=True)
        self.registry = ModelRegistry(self.state_dir / "models")
        self.leases = LeaseBook(self.state_dir / "leases.json", ttl_s=self.app.lease_hours * 3600)
        self.pseudo_tag = self.app.pseudo_tag
        self.pseudo_ahead = None  # set by the server process (lib/pseudo_ahead.py): the pseudo-label store + queue

    @property
    def dicomweb(self) -> bool:
        return str(self.studies).startswith(("http://", "https://"))

    @property
    def class_names(self) -> dict[int, str]:
        """id -> name: ``input.class_names`` (or the studies' dataset.json); on DICOMweb without them, the
        segment names of the PACS's DICOM-SEGs (the first labels)."""
        from ssl_medsam2.preprocess import InputSettings

        names = InputSettings.from_config(self.cfg).class_names
        if not names and self.dicomweb:
            names = self._labels_found()[1]
        return names

    @property
    def label_ids(self) -> set[int] | None:
        """Class ids a saved label may hold: background, ``input.class_names`` and ``input.classes``.

        Where neither the config nor the data's dataset.json names a class, the ids of the human labels
        already in the datastore (``labels/final``, or the DICOM-SEGs of the PACS, read once) are the
        label set, so a stray 7 or 255 is still refused with neutral class names; None (any id) only
        while no label exists yet."""
        from ssl_medsam2.preprocess import InputSettings

        ids = InputSettings.from_config(self.cfg).label_ids
        return self._labels_found()[0] if ids is None else ids

    def _labels_found(self) -> tuple[set[int] | None, dict[int, str]]:
        """(class ids, names from the SEGs' segments) of the final labels in the datastore, read once."""
        found = getattr(self, "_found", None)
        if found is None:  # kept once a label exists (until then every call looks again: cheap, no label)
            found = self._read_final_labels()
            self._found = found if found[0] is not None else None
        return found

    def _read_final_labels(self) -> tuple[set[int] | None, dict[int, str]]:
        import nibabel as nib
        import numpy as np

        found: set[int] = set()
        names: dict[int, str] = {}
        if self.dicomweb:  # the PACS's SEGs, each converted onto its image's grid
            files = []
            for image_id, (_, lab) in self.final_labelled().items():
                files.append(Path(lab))
                info = self.datastore.get_label_info(image_id, FINAL_TAG) or {}
                names.update({int(k): str(v) for k, v in (info.get("ssl_segment_names") or {}).items()})
        else:
            final = Path(self.studies) / "labels" / "final"
            files = sorted(final.glob("*.nii*")) if final.is_dir() else []
        for f in files:
            if f.is_symlink() or not f.is_file():
                continue
            try:
                found |= {int(v) for v in np.unique(np.asarray(nib.load(str(f)).dataobj))}
            except Exception:  # an unreadable label says nothing about the label set
                continue
        return (({0} | found) if found - {0} else None), {c: n for c, n in names.items() if c in found}

    def segment_ids(self, segments: dict[int, str], shown_name: str = "DICOM-SEG") -> dict[int, int]:
        """A DICOM-SEG's segment numbers -> the app's class ids, by segment name (InputError otherwise)."""
        from ssl_medsam2.dicom_seg import segment_label_ids

        return segment_label_ids(segments, self.class_names, self.label_ids, shown_name)

    def segment_info(self, label_path: str) -> list[dict]:
        """``label_info`` for a DICOM-SEG of this label: one entry per class id present, named by the app."""
        import nibabel as nib
        import numpy as np
        from ssl_medsam2.preprocess import class_name

        ids = sorted(int(v) for v in np.unique(np.asarray(nib.load(label_path).dataobj)) if v > 0)
        return [{"name": class_name(self.class_names, c), "idx": c} for c in ids]

    # -- folders --
    #: per-request temporary files (uploads being checked); each request removes its own folder
    scratch_root = Under("state_dir", "scratch")
    #: few-shot outputs (labels/, probabilities/, entropy/, summaries/) of the latest few-shot infer
    fewshot_dir = Under("state_dir", "fewshot")
    train_stats_path = Under("state_dir", "train_stats.json")

    pseudo_store_dir = Under("state_dir", "pseudo_store")

    def stored_pseudo_label(self, image_id: str) -> dict | None:
        """The image's stored few-shot pseudo label, the base for interactive corrections: ``path`` (uint8
        NIfTI on the image's grid), ``engine``, ``supports``, ``computed_at``, ``digest`` and ``current``
        (True / False; None where this process cannot tell: child processes). None when there is none."""
        from ssl_medsam2.pseudo_store import stored_pseudo_label

        ahead = self.pseudo_ahead
        if ahead is not None:
            task = ahead.task()
            rec = ahead.store.record(task.engine_name, image_id) if task else None
            return {**rec, "current": ahead.is_current(task, image_id)} if rec else None
        rec = stored_pseudo_label(self.pseudo_store_dir, image_id)
        return {**rec, "current": None} if rec else None

    def current_pseudo_label_path(self, image_id: str) -> str | None:
        """Path of the image's stored few-shot pseudo label (uint8 NIfTI on the image's grid) while it is
        current, i.e. made from today's final labels, settings and image file: the base label an
        interactive correction starts from. None when there is none, it is not current (its recomputation
        is queued), or this process cannot tell (child processes: use :meth:`stored_pseudo_label`)."""
        rec = self.stored_pseudo_label(image_id)
        return rec["path"] if rec and rec["current"] is True else None

    def predictions_dir(self, version: str) -> Path:
        return self.state_dir / "predictions" / version

    # -- datastore views --
    def final_labelled(self) -> dict[str, tuple[str, str]]:
        """image id -> (image path, final label path) for every image with a final (human) label."""
        out = {}
        for i in sorted(self.datastore.get_labeled_images()):
            paths = self._final_paths(i)
            if paths:
                out[i] = paths
        return out

    def _final_paths(self, image_id: str) -> tuple[str, str] | None:
        """(image path, final label path) of ``image_id`` when both are at hand (a PACS: downloaded), else None
        (no final label, or a SEG that cannot be placed on its image)."""
        lab = self.datastore.get_label_uri(image_id, FINAL_TAG)
        img = self.datastore.get_image_uri(image_id) if lab else ""
        return (img, lab) if lab and img and os.path.exists(lab) and os.path.exists(img) else None

    def newest_final_labelled(self, n: int) -> dict[str, tuple[str, str]]:
        """:meth:`final_labelled` of the ``n`` images whose final labels were saved last, and only those are
        read (a PACS: downloaded). When saved: the DICOM-SEG's own date and time on a PACS (the datastore's
        ``final_label_stamps``; a local copy's file time is when this server converted it), the label
        file's modification time in a studies folder. Ties: by id."""
        ds = self.datastore
        ids = list(ds.get_labeled_images())
        stamps = getattr(ds, "final_label_stamps", None)
        if stamps is not None:
            known = stamps()
            order = sorted(ids, key=lambda i: (known.get(i, ""), i))
        else:
            def saved(i):
                lab = ds.get_label_uri(i, FINAL_TAG)
                return os.stat(lab).st_mtime_ns if lab and os.path.exists(lab) else -1

            when = {i: saved(i) for i in ids}
            order = sorted(ids, key=lambda i: (when[i], i))
        out = {}
        for i in reversed(order):  # newest first, until n usable ones (a SEG that cannot be placed is skipped)
            if len(out) >= n:
                break
            paths = self._final_paths(i)
            if paths:
                out[i] = paths
        return out

    def unlabelled(self) -> list[str]:
        return sorted(self.datastore.get_unlabeled_images())

    def image_ids(self) -> list[str]:
        return sorted(self.datastore.list_images())

    def has_image(self, image_id: str) -> bool:
        if image_id in set(self.datastore.list_images()):
            return True
        refresh = getattr(self.datastore, "refresh_image_list", None)  # a PACS: the list may be stale
        if refresh is None:
            return False
        refresh()
        return image_id in set(self.datastore.list_images())

    def set_scores(self, image_id: str, scores: dict) -> None:
        """Write per-image scores into the datastore's image info (what strategies and clients read)."""
        if image_id and self.has_image(image_id):
            self.datastore.update_image_info(image_id, {**scores, "ssl_scores_ts": int(time.time())})

    @staticmethod
    def quality_scores(summary: dict) -> dict:
        """The image-info keys of a few-shot summary's quality verdict (ssl_medsam2.quality)."""
        return {"ssl_quality": (summary.get("quality") or {}).get("score"),
                "ssl_fewshot_failed": bool(summary.get("failed", False)),
                "ssl_fewshot_failed_reasons": (summary.get("quality") or {}).get("reasons", [])}

    def failed_pseudo_labels(self) -> list[str]:
        """Images whose stored few-shot pseudo label failed the quality gate (shown in /info)."""
        from ssl_medsam2.quality import failed_cases

        return failed_cases(self.fewshot_dir / "summaries", self.image_ids())

    def image_info(self, image_id: str) -> dict:
        return self.datastore.get_image_info(image_id) or {}
