"""Few-shot engines behind one interface (:class:`~ssl_medsam2.engines.base.FewShotEngine`).

Engines are found by name, so the CLI, the MONAI Label app and the config only ever name them.
Engine modules import heavy dependencies (sam2, SimpleITK) only when built.
"""

from __future__ import annotations

from .base import (Case, CampaignEngine, EngineResult, FewShotEngine, campaign_size, check_supports, classes_in,
                   predict_queries)

import logging

from ..config import merge
from ..protocol import ProtocolSettings

log = logging.getLogger(__name__)

ENGINE_NAMES = ("sam2", "atlas", "ensemble")
AUTO = "auto"


def choose_engine(cfg: dict) -> tuple[str, str]:
    """``protocol.engine`` as a concrete engine name, and why (one line for the user).

    ``auto``: SAM2 when its checkpoint is on this machine (or ``sam2.checkpoint: none`` asks for random
    weights), otherwise the weight-free atlas engine, so a first run works on any machine. Nothing is
    downloaded to decide.
    """
    name = ProtocolSettings.from_config(cfg).engine
    if name != AUTO:
        return name, f"protocol.engine={name}"
    from .sam2_model import SAM2Settings, checkpoint_status, model_spec, resolve_checkpoint

    ok, where = checkpoint_status(cfg)
    if ok:
        return "sam2", f"protocol.engine=auto and the SAM2 weights are here ({where})"
    settings = SAM2Settings.from_config(cfg)
    try:
        path = resolve_checkpoint(settings, model_spec(settings.model))[0]
    except Exception:  # a bad model name: the SAM2 engine would fail; atlas still works
        path = settings.checkpoint
    return "atlas", (f"protocol.engine=auto and no SAM2 checkpoint at {path}: using the weight-free atlas "
                     f"engine (put the checkpoint there or pass --checkpoint PATH for SAM2)")


def _chosen_engine(cfg: dict) -> str:
    """:func:`choose_engine`'s name, said once: one line where a choice was made (auto); an explicit
    engine is what the user asked for."""
    name, why = choose_engine(cfg)
    log.log(logging.DEBUG if name == ProtocolSettings.from_config(cfg).engine else logging.INFO,
            "few-shot engine: %s (%s)", name, why)
    return name


def with_engine_chosen(cfg: dict) -> dict:
    """``cfg`` with ``protocol.engine: auto`` replaced by the chosen engine; says which and why once."""
    return merge(cfg, {"protocol": {"engine": _chosen_engine(cfg)}})


def build_engine(name: str, cfg: dict) -> FewShotEngine:
    """Build the engine ``name`` (or ``auto``: :func:`choose_engine`) from the project config."""
    if name == AUTO:
        name = _chosen_engine(cfg)
    if name == "sam2":
        from .sam2_engine import SAM2Engine

        return SAM2Engine.from_config(cfg)
    if name == "atlas":
        from .atlas_engine import AtlasEngine

        return AtlasEngine.from_config(cfg)
    if name == "ensemble":
        from .ensemble import EnsembleEngine

        return EnsembleEngine([build_engine("sam2", cfg), build_engine("atlas", cfg)])
    raise ValueError(f"unknown engine '{name}' (choose from {', '.join(ENGINE_NAMES + (AUTO,))})")


__all__ = ["Case", "CampaignEngine", "EngineResult", "FewShotEngine", "build_engine", "campaign_size",
           "check_supports", "choose_engine", "classes_in", "predict_queries", "with_engine_chosen", "ENGINE_NAMES"]
