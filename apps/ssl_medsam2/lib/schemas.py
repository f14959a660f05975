"""The params each request may carry, checked before any work starts (infer, train, scoring, strategies).

Why: MONAI Label hands request params to the task as they come, so a wrong type or value fails deep
inside a worker (a 500, a reset connection, or a training child that dies after "SUBMITTED"). Here
every key is known, typed and ranged; a request with an unknown key or a bad value gets a 422 that
names the key, and nothing starts. The keys are those the app's tasks read plus those the real
clients send (Slicer: ``client_id`` and the task's config; OHIF: the ``result_*`` format,
``restore_label_idx``, ``label_prompt``, clicks).
"""

from __future__ import annotations

from typing import Any, Callable

from ssl_medsam2.config import merge
from ssl_medsam2.nnunet.settings import NnUNetSettings

from .guards import reject
from .infers import RESULT_DTYPES, RESULT_EXTENSIONS

Check = Callable[[str, Any], None]


def _fail(key: str, want: str, value: Any):
    raise reject(422, f"params '{key}' must be {want}, got {str(value)[:60]!r}")


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(key, value):
        if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) \
                or (hi is not None and value > hi):
            rng = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            _fail(key, "an integer" + (rng if lo is not None or hi is not None else ""), value)
    return check


def optional(check: Check) -> Check:
    return lambda key, value: None if value is None else check(key, value)


def text(max_len: int = 100) -> Check:
    def check(key, value):
        if not isinstance(value, str) or len(value) > max_len or any(ord(c) < 32 or ord(c) == 127 for c in value):
            _fail(key, f"a string of at most {max_len} characters without control characters", value)
    return check


def one_of(*choices) -> Check:
    def check(key, value):
        if value not in choices:
            _fail(key, "one of " + ", ".join(map(str, choices)), value)
    return check


def boolean(key, value):
    if not isinstance(value, bool) and str(value).lower() not in ("true", "false", "0", "1", "yes", "no"):
        _fail(key, "true or false", value)


def scalar_list(max_len: int = 10_000, depth: int = 1) -> Check:
    """A list of numbers or names (depth 1: OHIF's label_prompt) or of such lists (depth 2: click
    points); the app's tasks do not use them, clients send them, so only their shape is bounded."""
    def check(key, value):
        if not isinstance(value, list) or len(value) > max_len:
            _fail(key, f"a list of at most {max_len} items", value)
        for v in value:
            if depth > 1:
                scalar_list(16, depth - 1)(key, v)
            elif isinstance(v, bool) or not isinstance(v, (int, float, str)) or (isinstance(v, str) and len(v) > 100):
                _fail(key, "a list of numbers or names", value)
    return check


def any_json(key, value):
    """Free-form (e.g. OHIF's ``label_info`` for DICOM-SEG names and colours): depth is checked by guards."""


# results are sent as one file: a .mhd result would leave its .zraw data file behind on the server
# (.nrrd.gz: SimpleITK has no writer for it; result_compress=true gives a gzip-encoded .nrrd)
SINGLE_FILE = tuple(e for e in RESULT_EXTENSIONS if e not in (".mhd", ".nrrd.gz"))
CLIENT = {"client_id": optional(text()), "user": optional(text())}
INFER = {**CLIENT, "top_k": integer(0, 10_000), "fresh": boolean,
         "result_extension": one_of(*SINGLE_FILE, *(e.lstrip(".") for e in SINGLE_FILE)),
         "result_dtype": one_of(*RESULT_DTYPES), "result_compress": boolean, "restore_label_idx": boolean,
         "label_prompt": scalar_list(), "foreground": scalar_list(1000, 2), "background": scalar_list(1000, 2),
         "points": scalar_list(1000, 2), "point_labels": scalar_list(1000),
         "label_info": any_json}
STRATEGY = {**CLIENT, "seed": optional(integer(0, 2**63 - 1))}
SCORING = dict(CLIENT)
TRAIN_FIXED = {**CLIENT, "model": any_json, "name": optional(text())}


def check_params(params: dict, schema: dict[str, Check], what: str) -> dict:
    """``params`` if every key is in ``schema`` and its value passes; else 422 naming the keys."""
    unknown = sorted(k for k in params if k not in schema)
    if unknown:
        raise reject(422, f"unknown {what} params {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(sorted(schema))}")
    for k, v in params.items():
        schema[k](k, v)
    return params


TRAIN_ALIASES = {"max_epochs": "epochs"}  # MONAI Label's sample apps (and clients written for them) say max_epochs


def check_train(params: dict, model: str, cfg: dict) -> dict:
    """Train params: the caller's name/model fields and ``nnunet:`` config keys for this run only, each
    validated by the same typed section the CLI uses (epochs >= 1, a known configuration, ...).
    Returns the params with aliases replaced by the app's key names."""
    keys = NnUNetSettings.keys()
    for alias, key in TRAIN_ALIASES.items():
        if alias in params:
            if key in params:
                raise reject(422, f"train params give both '{alias}' and '{key}' (the same setting)")
            params = {**{k: v for k, v in params.items() if k != alias}, key: params[alias]}
    check_params(params, {**TRAIN_FIXED, **{k: any_json for k in keys}}, "train")
    if params.get("model") not in (None, model):
        _fail("model", f"'{model}' (the route's trainer) or absent", params.get("model"))
    over = {k: params[k] for k in keys if k in params}
    if over:
        try:
            NnUNetSettings.from_config(merge(cfg, {"nnunet": over}))
        except (ValueError, TypeError, KeyError) as exc:
            raise reject(422, f"train params: {exc}") from exc
    return params
