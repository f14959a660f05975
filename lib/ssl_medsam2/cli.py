"""``ssl-medsam2``: the command line. Each subcommand only parses arguments and calls the library.

Common options: ``--config`` (a YAML in configs/ or a path) and ``--set key.sub=value``
(repeatable) to override any config key; ``-v`` for debug logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import config as config_mod
from .io import InputError

log = logging.getLogger("ssl_medsam2")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="ssl_medsam2", help="config name in configs/ or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sam2.n_inserts=2 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _load_cfg(args, extra: dict | None = None) -> dict:
    cfg = config_mod.load_config(args.config, args.overrides)
    return config_mod.merge(cfg, extra) if extra else cfg


# --- pseudo-label ---------------------------------------------------------------------------------

def _add_pseudo_label(sub) -> None:
    p = sub.add_parser("pseudo-label", help="few-shot pseudo labels for every unlabelled image (TFFS)",
                       description="Images with a label file of the same case name in --labels are the "
                                   "supports; every other image is pseudo-labelled.")
    p.add_argument("--images", required=True, help="folder of NIfTI images (nnU-Net names like case_0000.nii.gz work)")
    p.add_argument("--labels", required=True, help="folder of label maps for the supports")
    p.add_argument("--out", required=True, help="output folder (labels/, probabilities/, entropy/, summaries/)")
    p.add_argument("--engine", choices=["sam2", "atlas", "ensemble"], help="few-shot engine (config: protocol.engine)")
    p.add_argument("--checkpoint", help="SAM2 checkpoint path, 'auto', or 'none' for RANDOM weights (tests only)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--cases", nargs="*", help="only these query case names")
    _common(p)
    p.set_defaults(func=_run_pseudo_label)


def _run_pseudo_label(args) -> int:
    from .pseudo_label import pseudo_label_folder

    extra: dict = {}
    if args.engine:
        extra.setdefault("protocol", {})["engine"] = args.engine
    if args.checkpoint:
        extra.setdefault("sam2", {})["checkpoint"] = args.checkpoint
    if args.device:
        extra.setdefault("sam2", {})["device"] = args.device
    cfg = _load_cfg(args, extra)
    summaries = pseudo_label_folder(args.images, args.labels, args.out, cfg, names=args.cases)
    for s in summaries:
        print(json.dumps({"case": s["case"], "mean_entropy_inside": s["mean_entropy_inside"],
                          "seconds": s["timings"]["total_s"], "random_weights": s.get("random_weights", False)}))
    print(f"wrote {len(summaries)} pseudo label(s) to {args.out}")
    return 0


# --- main -----------------------------------------------------------------------------------------

SUBCOMMANDS = [_add_pseudo_label]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-medsam2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
