"""The starting labels of the interactive benches: atlas pseudo labels of the unlabelled CHAOS volumes.

Why a module: ``bench/interactive.py`` and ``bench/annotation_cost.py`` both start from the pseudo labels
that the project's atlas engine gives the 6 other CHAOS T2-SPIR volumes when 2 are labelled
(chaos_01, chaos_02). They cost ~60-150 CPU-s per volume on a 2-core CPU, so they are computed once
(``ssl_medsam2.pseudo_label.pseudo_label_folder``, which resumes finished cases) into an ignored folder
named by a digest of the atlas settings: a changed setting computes them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from shared_data import CHAOS, REPO, chaos_cases

SUPPORTS = ("chaos_01", "chaos_02")
CACHE = REPO / "work_dirs" / "interactive"


def pseudo_label_dir(cfg: dict, supports=SUPPORTS, cache: Path = CACHE) -> Path:
    """The folder of the atlas pseudo labels (``labels/``, ``entropy/``, ``summaries/``) of every CHAOS
    volume but ``supports``, computed on first use."""
    from ssl_medsam2.pseudo_label import pseudo_label_folder

    digest = hashlib.sha256(json.dumps([cfg["atlas"], cfg["input"], cfg["protocol"], list(supports)],
                                       sort_keys=True, default=str).encode()).hexdigest()[:10]
    root = cache / f"pseudo-{digest}"
    labels = root / "support_labels"
    labels.mkdir(parents=True, exist_ok=True)
    for s in supports:
        link = labels / f"{s}.nii.gz"
        if not link.exists():
            os.symlink(CHAOS / "labelsTr" / f"{s}.nii.gz", link)
    queries = [c for c in chaos_cases() if c not in supports]
    if not all((root / "labels" / f"{q}.nii.gz").exists() for q in queries):
        cfg = json.loads(json.dumps(cfg))
        cfg["protocol"]["engine"] = "atlas"
        pseudo_label_folder(CHAOS / "imagesTr", labels, root, cfg, show_progress=False)
    return root


def passed_classes(folder: Path, case: str) -> frozenset[int]:
    """The organs of ``case``'s pseudo label in ``folder`` that passed the quality gate (its summary): the
    ones the app trusts as a correction's base (``apps/ssl_medsam2/lib/interactive.py``: ``base_label``)."""
    from ssl_medsam2.quality import trusted_classes

    return trusted_classes(json.loads((Path(folder) / "summaries" / f"{case}.json").read_text()).get("quality"))


def support_appearance(cfg: dict, supports=SUPPORTS, labels: dict | None = None):
    """The organ looks the server learns from its final labels (``ssl_medsam2.interactive.appearance``), here
    from ``supports`` (their true labels, or ``labels``: name -> label file or canonical array)."""
    from ssl_medsam2.interactive.appearance import AppearanceSettings, fit_appearance, labelled_examples

    s = AppearanceSettings.from_config(cfg)
    names = list(supports)[-s.max_images:]
    items = [(n, CHAOS / "imagesTr" / f"{n}_0000.nii.gz", (labels or {}).get(n, CHAOS / "labelsTr" / f"{n}.nii.gz"))
             for n in names]
    return fit_appearance(labelled_examples(items), (1, 2, 3, 4), s)


if __name__ == "__main__":
    import logging

    from ssl_medsam2.config import load_config

    logging.basicConfig(level=logging.INFO)
    print(pseudo_label_dir(load_config()))
