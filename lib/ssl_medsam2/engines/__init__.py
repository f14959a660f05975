"""Few-shot engines behind one interface (:class:`~ssl_medsam2.engines.base.FewShotEngine`).

Engines are found by name, so the CLI, the MONAI Label app and the config only ever name them.
Engine modules import heavy dependencies (sam2, SimpleITK) only when built.
"""

from __future__ import annotations

from .base import Case, EngineResult, FewShotEngine, check_supports, classes_in

ENGINE_NAMES = ("sam2", "atlas", "ensemble")


def build_engine(name: str, cfg: dict) -> FewShotEngine:
    """Build the engine ``name`` from the project config (its ``sam2`` / ``atlas`` sections)."""
    if name == "sam2":
        from .sam2_engine import SAM2Engine

        return SAM2Engine.from_config(cfg)
    if name == "atlas":
        from .atlas_engine import AtlasEngine

        return AtlasEngine.from_config(cfg)
    if name == "ensemble":
        from .ensemble import EnsembleEngine

        return EnsembleEngine([build_engine("sam2", cfg), build_engine("atlas", cfg)])
    raise ValueError(f"unknown engine '{name}' (choose from {', '.join(ENGINE_NAMES)})")


__all__ = ["Case", "EngineResult", "FewShotEngine", "build_engine", "check_supports", "classes_in", "ENGINE_NAMES"]
