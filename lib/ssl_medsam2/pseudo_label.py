"""Pseudo-label a folder: supports (images with labels) in, label + probability + entropy + summary
out for every query, with all-or-nothing writes per query.

Output layout (``out/``)::

    labels/<case>.nii.gz         label map (uint8), the query's affine and header
    probabilities/<case>.nii.gz  4D float32, channel i = mean probability of summary["classes"][i]
    entropy/<case>.nii.gz        4D float32, binary entropy (bits) of that probability
    summaries/<case>.json        per-class entropy summaries, runs, weights, timings, settings

Each query is written to a hidden staging folder first and moved into place only when complete,
so an error or an interrupt never leaves a partial case behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .engines.base import Case, FewShotEngine, campaign_size, check_supports, classes_in, predict_queries
from .executors import LOCAL, CaseJob, CasesFailed, Executor
from .io import (InputError, atomic_write, list_volumes, load_label_for, load_volume, save_like,
                 write_text_atomic)
from .preprocess import InputSettings, IntensityConfig, scale_to_uint8_range, with_dataset_class_names
from .protocol import ProtocolSettings, probabilities_to_label
from .quality import QualitySettings, assess, class_volumes_mm3, support_histograms
from .uncertainty import binary_entropy, summarize

log = logging.getLogger(__name__)

OUTPUT_KINDS = ("labels", "probabilities", "entropy", "summaries")


def case_files(images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None) -> tuple[dict, dict]:
    """(case -> image path, case -> label path) of an images folder and its labels folder, checked:
    at least one image, and no label without its image."""
    images = list_volumes(images_dir)
    if not images:
        raise InputError(images_dir, "no NIfTI image (.nii / .nii.gz) in this folder")
    labels = list_volumes(labels_dir) if labels_dir else {}
    unknown = sorted(set(labels) - set(images))
    if unknown:
        raise InputError(labels_dir, f"labels without an image: {', '.join(unknown)}")
    return images, labels


def load_cases(images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None,
               names: Sequence[str] | None = None) -> tuple[list[Case], list[Case]]:
    """Split a folder into supports (a label file with the same case name exists) and queries.

    Every file is read and checked (shape, affine, NaN, dimensionality) before anything runs.
    """
    images, labels = case_files(images_dir, labels_dir)
    supports, queries = [], []
    for name, path in images.items():
        if names is not None and name not in names and name not in labels:
            continue
        image = load_volume(path, name=name)
        if name in labels:
            supports.append(Case(image, load_label_for(image, labels[name])))
        else:
            queries.append(Case(image))
    return supports, queries


def resolve_classes(supports: Sequence[Case], classes: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(int(c) for c in classes) if classes else classes_in(supports)


def finalize(engine_result, query: Case, cfg: dict) -> dict:
    """Engine probabilities -> label, entropy and the JSON summary (arrays in canonical order)."""
    pcfg = ProtocolSettings.from_config(cfg)
    probs = engine_result.probs
    label = probabilities_to_label(probs, engine_result.classes, pcfg.threshold, pcfg.keep_largest_component)
    entropy = binary_entropy(probs)
    inputs = InputSettings.from_config(cfg)
    per_class = {}
    for i, c in enumerate(engine_result.classes):
        s = summarize(entropy[i], label == c, pcfg.boundary_band)
        s["class_id"] = int(c)
        per_class[inputs.class_name(c)] = s
    inside = [v["mean_entropy_inside"] for v in per_class.values() if v["mean_entropy_inside"] is not None]
    band = [v["mean_entropy_boundary"] for v in per_class.values() if v["mean_entropy_boundary"] is not None]
    summary = {
        "case": query.name,
        "image": query.image.path,
        "classes": [int(c) for c in engine_result.classes],
        "class_names": {str(c): inputs.class_name(c) for c in engine_result.classes},
        "mean_entropy_inside": float(np.mean(inside)) if inside else None,
        "mean_entropy_boundary": float(np.mean(band)) if band else None,
        "per_class": per_class,
        "n_runs": engine_result.n_runs,
        **engine_result.meta,
    }
    return {"label": label, "probabilities": probs, "entropy": entropy, "summary": summary}


def add_quality(outputs: dict, engine_result, supports: Sequence[Case], query: Case, cfg: dict) -> None:
    """The case's quality record and gate verdict (:mod:`ssl_medsam2.quality`) into its summary."""
    classes = engine_result.classes
    support_volumes: dict[int, list[float]] = {}
    for s in supports:
        for c, v in class_volumes_mm3(s.label.array, s.label.spacing, classes).items():
            support_volumes.setdefault(c, []).append(v)
    inputs = InputSettings.from_config(cfg)
    settings = QualitySettings.from_config(cfg)
    intensity = IntensityConfig.from_config(cfg)
    hist = support_histograms(((scale_to_uint8_range(s.image.array, intensity), s.label.array) for s in supports),
                              classes, settings.appearance_bins)
    q = assess(outputs["probabilities"], outputs["entropy"], outputs["label"], classes, query.image.spacing,
               support_volumes, engine_result.meta, settings, {int(c): inputs.class_name(c) for c in classes},
               query_norm=scale_to_uint8_range(query.image.array, intensity), support_hist=hist)
    outputs["summary"]["quality"] = q
    outputs["summary"]["failed"] = q["failed"]
    if q["failed"]:
        log.warning("%s: pseudo label FAILED the quality gate (%s): it will not train nnU-Net and goes to an "
                    "annotator first", query.name, "; ".join(q["reasons"]))


def case_paths(out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Where one case's outputs live: ``out_dir/<kind>/<name>.nii.gz`` (summaries: ``.json``)."""
    return {k: Path(out_dir) / k / (f"{name}.json" if k == "summaries" else f"{name}.nii.gz")
            for k in OUTPUT_KINDS}


def is_finished(out_dir: str | os.PathLike, name: str, producer: str | None = None) -> bool:
    """All of a case's outputs are in place (the summary is moved in last) and, with ``producer``, were
    made by it (the summary's ``producer``: engine, settings and supports, see :func:`run_producer`)."""
    paths = case_paths(out_dir, name)
    if not all(p.exists() for p in paths.values()):
        return False
    if producer is None:
        return True
    try:
        return json.loads(paths["summaries"].read_text()).get("producer") == producer
    except (OSError, ValueError):
        return False


def run_producer(cfg: dict, engine_name: str, supports: Sequence[Case], classes) -> str:
    """The digest of what makes a folder run's pseudo labels (engine, the settings that change them, the
    classes and each support's label content): a resumed run skips only cases made by the same."""
    from .pseudo_store import file_fingerprint, producer_digest, producer_settings

    def fingerprint(case: Case) -> str:
        if case.label.path and os.path.exists(case.label.path):
            return file_fingerprint(case.label.path)
        return hashlib.sha1(np.ascontiguousarray(case.label.array).tobytes()).hexdigest()

    return producer_digest(engine_name, {**producer_settings(cfg), "classes": [int(c) for c in classes]},
                           {s.name: fingerprint(s) for s in supports})


@contextlib.contextmanager
def _staged_case(out_dir: str | os.PathLike, name: str):
    """Yield staging paths for one case's files; on success move them all into place, else drop them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=out_dir))
    final = case_paths(out_dir, name)
    staged = {k: staging / f"{k}{final[k].name[len(name):]}" for k in OUTPUT_KINDS}
    try:
        yield staged
        for k in OUTPUT_KINDS:  # summaries last: their presence means the case is complete
            final[k].parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged[k], final[k])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_case_files(query: Case, outputs: dict, paths: dict[str, Path]) -> None:
    """The one encoder of a case's outputs (NIfTI on the query's source grid + JSON summary)."""
    desc = "ssl-medsam2 RANDOM WEIGHTS" if outputs["summary"].get("random_weights") else "ssl-medsam2"
    save_like(outputs["label"], query.image, paths["labels"], dtype=outputs["label"].dtype, description=desc)
    save_like(outputs["probabilities"], query.image, paths["probabilities"], dtype=np.float32,
              description=desc + " probability")
    save_like(outputs["entropy"], query.image, paths["entropy"], dtype=np.float32,
              description=desc + " entropy (bits)")
    write_text_atomic(json.dumps(outputs["summary"], indent=2, default=_json_default), paths["summaries"])


def write_outputs(out_dir: str | os.PathLike, query: Case, outputs: dict) -> dict[str, Path]:
    """Write one query's outputs all-or-nothing; returns the final paths."""
    with _staged_case(out_dir, query.name) as staged:
        _save_case_files(query, outputs, staged)
    return case_paths(out_dir, query.name)


def encode_outputs(query: Case, outputs: dict) -> dict[str, bytes]:
    """One query's output files as bytes (what :func:`write_outputs` would write), e.g. on a remote worker."""
    with tempfile.TemporaryDirectory(prefix="ssl_medsam2_case_") as tmp:
        paths = case_paths(tmp, query.name)
        _save_case_files(query, outputs, paths)
        return {k: p.read_bytes() for k, p in paths.items()}


def write_encoded(out_dir: str | os.PathLike, name: str, files: dict[str, bytes]) -> dict[str, Path]:
    """Write :func:`encode_outputs`' files all-or-nothing, exactly as :func:`write_outputs` does."""
    with _staged_case(out_dir, name) as staged:
        for k in OUTPUT_KINDS:
            atomic_write(staged[k], lambda tmp, b=files[k]: Path(tmp).write_bytes(b))
    return case_paths(out_dir, name)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def pseudo_label_case(engine: FewShotEngine, supports: Sequence[Case], query: Case, cfg: dict,
                      out_dir: str | os.PathLike | None = None,
                      progress: Callable[[int], None] | None = None) -> dict:
    """Run ``engine`` on one query; write outputs when ``out_dir`` is given. Returns the outputs."""
    return pseudo_label_cases(engine, supports, [query], cfg, out_dir, progress)[0]


def pseudo_label_cases(engine: FewShotEngine, supports: Sequence[Case], queries: Sequence[Case], cfg: dict,
                       out_dir: str | os.PathLike | None = None,
                       progress: Callable[[int], None] | None = None) -> list[dict]:
    """Run ``engine`` on a group of queries in one call where it takes several (a campaign of the batched
    SAM2 engine: their runs share its steps), then finalise, gate and (with ``out_dir``) write each query
    alone. Each summary's ``timings.total_s`` is its share of the engine call plus its own finalising."""
    classes = resolve_classes(supports, InputSettings.from_config(cfg).classes)
    check_supports(supports, classes)
    t0 = time.perf_counter()
    results = predict_queries(engine, supports, queries, classes, progress=progress)
    share = (time.perf_counter() - t0) / len(queries)
    all_outputs = []
    for query, result in zip(queries, results):
        t1 = time.perf_counter()
        outputs = finalize(result, query, cfg)
        add_quality(outputs, result, supports, query, cfg)
        timings = outputs["summary"].setdefault("timings", {})
        timings["total_s"] = round(share + time.perf_counter() - t1, 3)
        if len(queries) > 1:
            timings["campaign_queries"] = len(queries)
        outputs["summary"]["engine"] = engine.name
        outputs["summary"]["supports"] = [s.name for s in supports]
        if out_dir is not None:
            outputs["paths"] = {k: str(v) for k, v in write_outputs(out_dir, query, outputs).items()}
        all_outputs.append(outputs)
    return all_outputs


class PseudoLabelWorker:
    """One few-shot engine, built once per worker: its caches (support features, prompt memories,
    registered supports) serve every query it gets. It takes queries in groups of the engine's
    campaign size (:func:`~ssl_medsam2.engines.base.campaign_size`; 1 for most engines)."""

    def __init__(self, engine: FewShotEngine, supports: Sequence[Case], classes: tuple[int, ...], cfg: dict,
                 producer: str | None = None):
        self.engine, self.supports, self.classes, self.cfg = engine, supports, classes, cfg
        self.producer = producer

    def units(self, query: Case) -> int:
        return self.engine.work_units(self.supports, query, self.classes)

    def group_size(self) -> int:
        return campaign_size(self.engine)

    def run(self, query: Case, progress: Callable[[int], None] | None = None) -> dict:
        return self.run_group([query], progress)[0]

    def run_group(self, queries: Sequence[Case], progress: Callable[[int], None] | None = None) -> list[dict]:
        """Queries -> for each, {"files": its output files as bytes, "summary": its summary}."""
        results = []
        for query, out in zip(queries, pseudo_label_cases(self.engine, self.supports, queries, self.cfg,
                                                          progress=progress)):
            if self.producer:
                out["summary"]["producer"] = self.producer
            log.info("%s: %s voxels labelled, mean entropy inside %.4f, %.1fs", query.name,
                     int((out["label"] > 0).sum()), out["summary"]["mean_entropy_inside"] or float("nan"),
                     out["summary"]["timings"]["total_s"])
            results.append({"files": encode_outputs(query, out), "summary": out["summary"]})
        return results


@dataclass
class PseudoLabelSpec:
    """How to build a :class:`PseudoLabelWorker`: the engine by name (or a given engine object, in this
    process only), the supports read and checked by the driver."""

    cfg: dict
    engine_name: str
    supports: list[Case]
    classes: tuple[int, ...]
    engine: FewShotEngine | None = None
    producer: str | None = None  # :func:`run_producer`, written into every summary

    def build(self) -> PseudoLabelWorker:
        from .engines import build_engine

        engine = self.engine if self.engine is not None else build_engine(self.engine_name, self.cfg)
        return PseudoLabelWorker(engine, self.supports, self.classes, self.cfg, self.producer)

    def portable(self) -> "PseudoLabelSpec":
        return dataclasses.replace(self, engine=None)  # another machine builds its own by name


def pseudo_label_case_on(executor: Executor, engine_name: str, supports: Sequence[Case], query: Case, cfg: dict,
                         out_dir: str | os.PathLike) -> dict:
    """:func:`pseudo_label_case` of one query where ``executor`` runs cases (on Ray: a worker builds the
    engine by name and gets the supports with the job), its files written all-or-nothing into ``out_dir``.
    Returns the outputs as :func:`pseudo_label_case` does (label and entropy in canonical order, summary,
    paths); a failed case raises RuntimeError with the executor's reason."""
    import nibabel as nib

    classes = resolve_classes(supports, InputSettings.from_config(cfg).classes)
    check_supports(supports, classes)
    results: dict[str, dict] = {}
    job = CaseJob(desc=f"pseudo-label ({engine_name})", doing=f"{engine_name}: pseudo-labelling",
                  worker=PseudoLabelSpec(cfg, engine_name, list(supports), classes),
                  read=lambda _name: query, write=results.__setitem__)
    failed = executor.run(job, [query.name], show_progress=False)
    if query.name not in results:
        reason = (failed.get(query.name) or "the executor returned no result").strip().splitlines()
        raise RuntimeError(f"{query.name}: {reason[-1] if reason else 'failed'}")
    paths = write_encoded(out_dir, query.name, results[query.name]["files"])
    entropy = np.moveaxis(np.asarray(nib.load(str(paths["entropy"])).dataobj), -1, 0)
    return {"label": load_label_for(query.image, paths["labels"]).array,
            "entropy": query.image.in_canonical_order(entropy), "summary": results[query.name]["summary"],
            "paths": {k: str(v) for k, v in paths.items()}}


def pseudo_label_folder(images_dir, labels_dir, out_dir, cfg: dict, engine: FewShotEngine | None = None,
                        show_progress: bool = True, names: Sequence[str] | None = None,
                        executor: Executor | None = None) -> list[dict]:
    """Pseudo-label every unlabelled image of ``images_dir``; returns the per-query summaries.

    Supports are read and checked here first (a bad support stops everything before any work). The
    queries go to ``executor`` (default: this process, :class:`~ssl_medsam2.executors.LocalExecutor`;
    a cluster executor reads each query as a worker frees up, reports a bad one once and goes on,
    then raises :class:`~ssl_medsam2.executors.CasesFailed`). ``out_dir/run.json`` records the run.
    """
    from .engines import with_engine_chosen

    cfg = with_dataset_class_names(cfg, images_dir)
    if executor is None:
        if (cfg.get("cluster") or {}).get("ray_address"):
            raise ValueError("cluster.ray_address is set but no executor was given: pass "
                             "executor=ssl_medsam2.cluster.executor_for(cfg) (the CLI, run_ssl and the app do)")
        executor = LOCAL
    if engine is None:  # protocol.engine: auto -> sam2 or atlas, decided once here and said in one line
        cfg = with_engine_chosen(cfg)
    engine_name = getattr(engine, "name", None) or ProtocolSettings.from_config(cfg).engine
    images, labels = case_files(images_dir, labels_dir)
    supports, _ = load_cases(images_dir, labels_dir, names=())  # supports only: queries are read as they run
    classes = resolve_classes(supports, InputSettings.from_config(cfg).classes)
    check_supports(supports, classes)
    queries = [n for n in images if n not in labels and (names is None or n in names)]
    if not queries:
        log.warning("every image in %s has a label: nothing to pseudo-label", images_dir)
        return []
    producer = run_producer(cfg, engine_name, supports, classes)
    skipped = [n for n in queries if executor.skips_finished and is_finished(out_dir, n, producer)]
    todo = [n for n in queries if n not in skipped]
    if skipped:
        log.info("resuming: %d of %d case(s) already finished in %s with the same engine, settings and supports, "
                 "skipped: %s", len(skipped), len(queries), out_dir, ", ".join(skipped))
    redo = [n for n in todo if is_finished(out_dir, n)]
    if redo and executor.skips_finished:
        log.info("%d case(s) in %s were made with other settings or supports and are made again: %s",
                 len(redo), out_dir, ", ".join(redo))
    done: dict[str, dict] = {}

    def write(name: str, result: dict) -> None:
        write_encoded(out_dir, name, result["files"])
        done[name] = result["summary"]

    job = CaseJob(desc=f"pseudo-label ({engine_name})", doing=f"{engine_name}: pseudo-labelling",
                  worker=PseudoLabelSpec(cfg, engine_name, supports, classes, engine, producer),
                  read=lambda name: Case(load_volume(images[name], name=name)), write=write, read_ahead=True)
    failed = executor.run(job, todo, show_progress=show_progress, initial=len(queries) - len(todo))
    summaries = []
    for n in queries:
        p = case_paths(out_dir, n)["summaries"]
        if n in done:
            summaries.append(done[n])
        elif n not in failed and p.exists():
            summaries.append(json.loads(p.read_text()))
    write_run_json(out_dir, engine_name, supports, queries, classes, summaries, failed=failed, skipped=skipped,
                   producer=producer, **executor.run_info())
    if failed:
        raise CasesFailed(failed, len(summaries))
    return summaries


def write_run_json(out_dir, engine_name: str, supports: Sequence[Case], queries: Sequence[str], classes,
                   summaries: list[dict], **extra) -> Path:
    """``out_dir/run.json``: what a folder run did (engine, supports, queries, summaries, ...)."""
    failed_quality = [s["case"] for s in summaries if s.get("failed")]
    return write_text_atomic(json.dumps({"engine": engine_name, "supports": [s.name for s in supports],
                                         "queries": list(queries), "classes": list(classes),
                                         "failed_quality": failed_quality, "summaries": summaries, **extra},
                                        indent=2, default=_json_default),
                             Path(out_dir) / "run.json")
