"""``ssl-medsam2``: the command line. Each subcommand only parses arguments and calls the library.

Common options: ``--config`` (a YAML in configs/ or a path) and ``--set key.sub=value``
(repeatable) to override any config key; ``-v`` for debug logs.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import shlex
import signal
import sys
import threading

from . import __version__
from . import config as config_mod
from .io import InputError

log = logging.getLogger("ssl_medsam2")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="ssl_medsam2", help="config name in configs/ or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sam2.n_inserts=2 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _subcommand(sub, run, options) -> argparse.ArgumentParser:
    """The parser of the subcommand that ``run`` carries out (``_run_make_studies``: ``make-studies``): help
    and description from ``run``'s docstring (first line, rest), then ``options(parser)``, then the common ones."""
    help_line, _, description = (inspect.getdoc(run) or "").partition("\n")
    p = sub.add_parser(run.__name__.removeprefix("_run_").replace("_", "-"), help=help_line,
                       description=" ".join(description.split()))
    options(p)
    _common(p)
    p.set_defaults(func=run)
    return p


def _ray_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", metavar="ADDRESS",
                   help="spread the cases over a Ray cluster: local (start one here), auto, ray://host:port "
                        "(config: cluster.ray_address; default: in-process)")


def _load_cfg(args, shortcuts: dict[str, str] | None = None) -> dict:
    """The config with the ``--set`` overrides, then the command's shortcut options that were given
    (``shortcuts``: option attribute -> ``section.key``; ``--ray`` is ``cluster.ray_address``)."""
    extra: dict = {}
    for attr, dotted in {**(shortcuts or {}), "ray": "cluster.ray_address"}.items():
        value = getattr(args, attr, None)
        if value is not None:
            section, key = dotted.split(".")
            extra.setdefault(section, {})[key] = value
    cfg = config_mod.load_config(args.config, args.overrides)
    return config_mod.merge(cfg, extra) if extra else cfg


# --- what each command takes (besides the common options) -------------------------------------------

def _paths(p: argparse.ArgumentParser, **helps: str) -> None:
    """The command's required path options, in this order (``--<name>``: help)."""
    for name, help in helps.items():
        p.add_argument(f"--{name}", required=True, help=help)


def _options_pseudo_label(p: argparse.ArgumentParser) -> None:
    _paths(p, images="folder of NIfTI images (nnU-Net names like case_0000.nii.gz work)",
              labels="folder of label maps for the supports",
              out="output folder (labels/, probabilities/, entropy/, summaries/)")
    p.add_argument("--engine", choices=["auto", "sam2", "atlas", "ensemble"],
                   help="few-shot engine (config: protocol.engine; auto = sam2 when its checkpoint is here, else atlas)")
    p.add_argument("--checkpoint", help="SAM2 checkpoint path, 'auto', or 'none' for RANDOM weights (tests only)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--cases", nargs="*", help="only these query case names")
    _ray_option(p)


def _options_run(p: argparse.ArgumentParser) -> None:
    _paths(p, images="folder of NIfTI images (labelled and unlabelled)",
              labels="folder of ground-truth label maps for some of the images",
              work="work folder (round_000/, round_001/, ..., final.json)")
    p.add_argument("--pseudo-labels", help="use these as round 0 instead of running the few-shot engine "
                                           "(a labels folder or a pseudo-label output folder)")
    p.add_argument("--engine", choices=["auto", "sam2", "atlas", "ensemble"],
                   help="few-shot engine for round 0 (auto = sam2 when its checkpoint is here, else atlas)")
    p.add_argument("--max-rounds", type=int, help="config: nnunet.max_rounds")
    p.add_argument("--schedule", help="nnU-Net training length: auto (CUDA: full, CPU: short) | short | full | "
                                      "minutes:N (config: nnunet.schedule)")
    p.add_argument("--configuration", choices=["2d", "3d_fullres"], help="config: nnunet.configuration")
    p.add_argument("--device", help="nnU-Net device: cpu | cuda | auto (config: nnunet.device)")
    _ray_option(p)


def _options_predict(p: argparse.ArgumentParser) -> None:
    _paths(p, model="work folder of `ssl-medsam2 run` (final.json) or a model folder",
              images="folder of NIfTI images",
              out="output folder for <case>.nii.gz label maps")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (config: nnunet.device)")
    p.add_argument("--mirroring", action="store_true", help="test-time mirroring (slower, a little better)")


def _options_make_studies(p: argparse.ArgumentParser) -> None:
    _paths(p, images="folder of images (imagesTr/)",
              out="new studies folder (for --studies of the server)")
    p.add_argument("--labels", help="folder of labels (labelsTr/)")
    p.add_argument("--labelled", type=int, default=2, help="how many cases keep their label (first by name)")
    p.add_argument("--cases", nargs="*", help="exactly these cases keep their label (instead of --labelled)")


def _options_evaluate(p: argparse.ArgumentParser) -> None:
    _paths(p, pred="folder of predicted label maps (e.g. pseudo-label's out/labels)",
              gt="folder of ground-truth label maps",
              out="output folder")
    p.add_argument("--images", help="image folder: background of the report's overlays (optional)")
    p.add_argument("--classes", nargs="*", type=int, help="class ids to score (default: every id in the ground truth)")
    p.add_argument("--no-report", action="store_true", help="skip the PNG report")


# --- pseudo-label ---------------------------------------------------------------------------------

def _run_pseudo_label(args) -> int:
    """few-shot pseudo labels for every unlabelled image (TFFS)

    Images with a label file of the same case name in --labels are the supports; every other image is
    pseudo-labelled.
    """
    from .cluster import executor_for
    from .pseudo_label import pseudo_label_folder

    cfg = _load_cfg(args, {"engine": "protocol.engine", "checkpoint": "sam2.checkpoint", "device": "sam2.device"})
    summaries = pseudo_label_folder(args.images, args.labels, args.out, cfg, names=args.cases,
                                    executor=executor_for(cfg))
    for s in summaries:
        print(json.dumps({"case": s["case"], "mean_entropy_inside": s["mean_entropy_inside"],
                          "quality": (s.get("quality") or {}).get("score"), "failed": s.get("failed", False),
                          "seconds": s["timings"]["total_s"], "random_weights": s.get("random_weights", False)}))
    print(f"wrote {len(summaries)} pseudo label(s) to {args.out}")
    failed = [s["case"] for s in summaries if s.get("failed")]
    if failed:
        print(f"FAILED the quality gate ({len(failed)}): {', '.join(failed)}: not used to train nnU-Net; "
              f"check or annotate them first (reasons in summaries/<case>.json, quality.reasons)")
    return 0


# --- run / predict (FSL-nnUNet) ---------------------------------------------------------------------

def _run_run(args) -> int:
    """whole pipeline: few-shot pseudo labels -> nnU-Net rounds -> final model

    Round 0: few-shot pseudo labels for every unlabelled image; then nnU-Net rounds (train on labels + pseudo
    labels, re-predict) until the pseudo labels stop changing (nnunet.min_change) or nnunet.max_rounds. A round
    is deployed only if it is not worse than the deployed one on a held-out labelled case (nnunet.quality_gate);
    a worse round stops the loop. Re-running on the same --work resumes (a stopped training from its checkpoint)
    and recomputes nothing finished; another --schedule applies from the round in progress. Ctrl-C stops with
    one line: what is kept and the command to resume.
    """
    from .cluster import executor_for
    from .nnunet.rounds import run_ssl

    cfg = _load_cfg(args, {"engine": "protocol.engine", "max_rounds": "nnunet.max_rounds",
                           "configuration": "nnunet.configuration", "device": "nnunet.device",
                           "schedule": "nnunet.schedule"})
    with ctrl_c_for_this_process_only():
        state = run_ssl(args.images, args.labels, args.work, cfg, pseudo_labels_dir=args.pseudo_labels,
                        executor=executor_for(cfg))
    for r in state["rounds"]:
        print(json.dumps(r))
    final = state.get("final", {})  # a quality-gate refusal: run_ssl logged it framed; stop_reason repeats it
    print(f"{state.get('stop_reason', '')}; deployed: round {final.get('round')} "
          f"({final.get('model_dir') or 'few-shot pseudo labels, no nnU-Net model'})")
    return 0


def _run_predict(args) -> int:
    """segment new volumes with the final nnU-Net model of a run

    Runs nnU-Net's predictor; labels keep each image's affine and header.
    """
    from .devices import resolve_device
    from .nnunet.predict import predict_folder
    from .nnunet.settings import NnUNetSettings

    cfg = _load_cfg(args)
    settings = NnUNetSettings.from_config(cfg)
    paths = predict_folder(args.model, args.images, args.out, device=resolve_device(args.device or settings.device),
                           use_mirroring=args.mirroring or settings.use_mirroring, cfg=cfg)
    print(f"wrote {len(paths)} label map(s) to {args.out}")
    return 0


# --- make-studies ---------------------------------------------------------------------------------

def _run_make_studies(args) -> int:
    """copy an nnU-Net dataset into a MONAI Label studies folder

    Images go to OUT/<case>.nii.gz; the labels of the first N cases (or of --cases) go to OUT/labels/final/ as
    the app's human labels.
    """
    from .studies import make_studies

    res = make_studies(args.images, args.labels, args.out, args.cases if args.cases else args.labelled)
    print(f"{len(res['images'])} image(s) in {res['studies']}, final labels for: {', '.join(res['labelled']) or 'none'}")
    return 0


# --- evaluate -------------------------------------------------------------------------------------

def _run_evaluate(args) -> int:
    """Dice and HD95 (mm) of label maps against ground truth, CSV + JSON + PNG

    Scores every label map in --pred that has a ground truth of the same case name in --gt; writes metrics.csv,
    metrics.json and report.png to --out.
    """
    from .evaluate import evaluate_folders
    from .preprocess import InputSettings, IntensityConfig, with_dataset_class_names

    cfg = with_dataset_class_names(_load_cfg(args), args.gt)  # names from the ground truth's dataset.json
    result = evaluate_folders(args.pred, args.gt, args.out, classes=args.classes or None,
                              class_names=InputSettings.from_config(cfg).class_names, images_dir=args.images,
                              report=not args.no_report, intensity=IntensityConfig.from_config(cfg))
    for name, pc in result["per_class"].items():
        d, h = pc["dice"], pc["hd95_mm"]
        hd = "n/a" if h["mean"] is None else f"{h['mean']:.1f} mm"
        print(f"{name}: Dice mean {d['mean']:.3f} (min {d['min']:.3f}, {d['n']} cases), HD95 mean {hd}")
    if result["missing_predictions"]:
        print(f"no prediction for: {', '.join(result['missing_predictions'])}")
    print(f"wrote metrics.csv, metrics.json{', report.png' if not args.no_report else ''} to {args.out}")
    return 0


# --- serve ----------------------------------------------------------------------------------------

def _options_serve(p: argparse.ArgumentParser) -> None:
    from .server import STUDIES_ENV

    studies = os.environ.get(STUDIES_ENV) or None
    p.add_argument("--studies", required=studies is None, default=studies,
                   help=f"MONAI Label studies folder (make-studies) or a DICOMweb URL (default: ${STUDIES_ENV})")
    p.add_argument("--host", help="address to listen on (config: serve.host)")
    p.add_argument("--port", type=int, help="port (config: serve.port)")
    p.add_argument("--app-dir", help="writable folder for the app's files (config: serve.app_dir; "
                                     "default <studies>/.ssl_medsam2/app)")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="app setting for MONAI Label, e.g. --conf sam2.checkpoint PATH (repeatable; docs/app.md)")


def _run_serve(args) -> int:
    """start the MONAI Label app (shipped with this package) on a studies folder

    Copies the app's files to a writable folder and runs MONAI Label's start_server on them; --conf
    options go to the app, after those of $SSL_MEDSAM2_CONF_FILE and $SSL_MEDSAM2__SECTION__KEY
    (docs/deploy.md). Stop it with Ctrl-C.
    """
    from .server import ServeSettings, serve, site_conf

    site = site_conf(os.environ)  # a deployment's settings; the command line's --set / --conf win
    args.overrides = [f"{k}={v}" for k, v in site if "." in k] + args.overrides
    cfg = _load_cfg(args, {"host": "serve.host", "port": "serve.port", "app_dir": "serve.app_dir"})
    serve(args.studies, ServeSettings.from_config(cfg), site + [tuple(c) for c in args.conf])
    return 0  # not reached: serve() becomes the server process


# --- Ctrl-C ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def ctrl_c_for_this_process_only():
    """Ctrl-C reaches the whole foreground process group: nnU-Net's augmentation and preprocessing workers
    would each die with a traceback (and the trainer then with "background workers are no longer alive").
    A child inherits the signal mask of the thread that starts it, so SIGINT is blocked in this (main)
    thread while the work runs, and one idle thread started *before* that keeps it open: the signal lands
    there and Python raises KeyboardInterrupt in the main thread as usual, while every worker is born deaf
    to it (the pools and loaders are then stopped by their owners, quietly)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()
    threading.Thread(target=done.wait, name="ctrl-c", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        done.set()


def _stopped_line(args, argv: list[str]) -> str:
    """The one line after Ctrl-C: what is kept and the command that goes on from there."""
    again = "ssl-medsam2 " + shlex.join(argv)
    if args.command != "run":
        return f"ssl-medsam2 {args.command}: stopped (Ctrl-C); finished outputs are kept; run it again: {again}"
    from .nnunet.runstate import describe_kept

    return f"ssl-medsam2 run: stopped (Ctrl-C); kept: {describe_kept(args.work)}; resume with: {again}"


# --- main -----------------------------------------------------------------------------------------

#: (what a command does, what it takes); the command's name is the first one's without ``_run_``
SUBCOMMANDS = [(_run_pseudo_label, _options_pseudo_label), (_run_run, _options_run), (_run_predict, _options_predict),
               (_run_make_studies, _options_make_studies), (_run_evaluate, _options_evaluate), (_run_serve, _options_serve)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-medsam2",
        description="SSL-MedSAM2: training-free few-shot SAM2 pseudo labels, iterative nnU-Net refinement, "
                    "evaluation. Every subcommand takes --config and --set key.sub=value overrides.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for run, options in SUBCOMMANDS:
        _subcommand(sub, run, options)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError, KeyError, ValueError) as exc:
        # Bad input or configuration: one clear line, no traceback, non-zero exit.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"ssl-medsam2 {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n" + _stopped_line(args, argv), file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
