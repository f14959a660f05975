"""Build a SAM2 video predictor from a model config in ``configs/sam2/`` plus a checkpoint.

A model config names a base architecture YAML shipped inside the ``sam2`` package (so its Hydra
``_target_`` tree is never copied here), a few overrides (MedSAM2 = SAM2.1 tiny at 512 px), the
checkpoint file name and its download URL. The checkpoint is a path, or ``auto`` (the cache dir,
downloaded when missing and the machine is online), or ``none`` for random weights, which only a test
or a benchmark of mechanics should ask for: it is logged as a warning and stamped on every output.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CONFIG_DIR, Section, load_yaml
from ..io import atomic_write

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "none"


class CheckpointNotFound(FileNotFoundError):
    """The SAM2 / MedSAM2 weights are not on this machine (message says where to put them)."""


@dataclass(frozen=True)
class SAM2Settings(Section):
    """The ``sam2:`` section of the config, typed (what each key means: configs/ssl_medsam2.yaml)."""

    SECTION = "sam2"
    model: str
    checkpoint: str | None
    url: str | None
    download: bool
    cache_dir: str
    image_size: int | None
    n_supports: int
    n_inserts: int
    seed: int
    device: str | None
    dtype: str | None
    max_cond_frames_in_attn: int
    feature_batch: int
    support_cache_frames: int
    batch_runs: bool
    max_batch: str | int
    campaign_queries: str | int
    compile: bool

    def __post_init__(self):
        self._set(**{name: int(getattr(self, name)) for name in (
            "n_supports", "n_inserts", "seed", "max_cond_frames_in_attn", "feature_batch", "support_cache_frames")})
        self._set(**{name: bool(getattr(self, name)) for name in ("download", "batch_runs", "compile")})
        if self.image_size:
            self._set(image_size=int(self.image_size))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    base: str
    overrides: dict
    checkpoint_file: str
    url: str | None


def model_spec(model: str) -> ModelSpec:
    path = Path(model)
    if not path.exists():
        path = CONFIG_DIR / "sam2" / (model if model.endswith(".yaml") else f"{model}.yaml")
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / "sam2").glob("*.yaml"))
        raise FileNotFoundError(f"SAM2 model config '{model}' not found; known: {', '.join(known)}")
    d = load_yaml(path)
    return ModelSpec(path.stem, d["base"], dict(d.get("overrides") or {}), d["checkpoint_file"], d.get("url"))


def resolve_checkpoint(settings: SAM2Settings, spec: ModelSpec) -> tuple[Path | None, str]:
    """(path or None for random weights, human-readable origin). Does not download."""
    ckpt = settings.checkpoint
    if ckpt is None or str(ckpt).lower() == RANDOM_WEIGHTS:
        return None, "RANDOM weights (checkpoint: none)"
    if str(ckpt).lower() == "auto":
        return Path(os.path.expanduser(settings.cache_dir)) / spec.checkpoint_file, "auto"
    return Path(os.path.expanduser(str(ckpt))), "path"


def _missing_message(path: Path, spec: ModelSpec, url: str | None, why: str = "") -> str:
    return (f"SAM2 checkpoint not found: {path}. {why}"
            f"Get '{spec.checkpoint_file}'" + (f" from {url}" if url else "") +
            f" and put it at {path}, or pass its location with --checkpoint PATH "
            f"(config sam2.checkpoint, MONAI Label --conf sam2.checkpoint PATH). "
            f"No weights at hand? --engine atlas makes pseudo labels without any (weight-free registration). "
            f"For tests of the mechanics only: --checkpoint none runs RANDOM weights.")


def missing_checkpoint(cfg: dict) -> dict | None:
    """What is missing when the configured checkpoint file is not there: {"path", "file", "url"}; None when
    weights are at hand (or random weights are asked for). A server words its own advice from this."""
    settings = SAM2Settings.from_config(cfg)
    spec = model_spec(settings.model)
    path, _ = resolve_checkpoint(settings, spec)
    if path is None or path.is_file():
        return None
    return {"path": path, "file": spec.checkpoint_file, "url": settings.url or spec.url}


def checkpoint_status(cfg: dict) -> tuple[bool, str]:
    """Whether real weights are available for the configured model, and why not (the CLI's wording)."""
    settings = SAM2Settings.from_config(cfg)
    try:
        spec = model_spec(settings.model)
    except Exception as exc:  # a bad model name is also "unavailable"
        return False, str(exc)
    path, origin = resolve_checkpoint(settings, spec)
    if path is None:
        return True, origin
    if path.is_file():
        return True, str(path)
    return False, _missing_message(path, spec, settings.url or spec.url)


def ensure_checkpoint(settings: SAM2Settings, spec: ModelSpec) -> Path | None:
    """The checkpoint path (downloading an ``auto`` one when allowed), None for random weights."""
    path, origin = resolve_checkpoint(settings, spec)
    if path is None or path.is_file():
        return path
    url = settings.url or spec.url
    if origin == "auto" and url and settings.download:
        log.info("downloading %s from %s", spec.checkpoint_file, url)
        try:
            return atomic_write(path, lambda tmp: torch.hub.download_url_to_file(url, tmp, progress=True))
        except Exception as exc:
            raise CheckpointNotFound(_missing_message(path, spec, url, f"Download failed ({exc}). ")) from exc
    raise CheckpointNotFound(_missing_message(path, spec, url))


def _sam2_base_config(base: str):
    from omegaconf import OmegaConf

    import sam2

    path = Path(sam2.__path__[0]) / "configs" / base
    if not path.exists():
        raise FileNotFoundError(f"base config {base} not found in the sam2 package ({path})")
    return OmegaConf.load(path)


def has_sam2_cuda_ext() -> bool:
    try:
        import sam2._C  # noqa: F401

        return True
    except Exception:
        return False


def build_predictor(settings: SAM2Settings, device: torch.device):
    """Instantiate :class:`InMemoryVideoPredictor` with the configured architecture and weights.

    Returns (predictor, info) where info records the weights used (path or RANDOM).
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    spec = model_spec(settings.model)
    ckpt = ensure_checkpoint(settings, spec)
    cfg = _sam2_base_config(spec.base)
    overrides = dict(spec.overrides)
    if settings.image_size:
        overrides["model.image_size"] = settings.image_size
    overrides["model.max_cond_frames_in_attn"] = settings.max_cond_frames_in_attn
    if 0 <= overrides["model.max_cond_frames_in_attn"] < 2:
        raise ValueError("sam2.max_cond_frames_in_attn must be >= 2 or -1 (all)")
    # The video predictor and the post-processing settings SAM2's own builder applies for video.
    overrides.update({
        "model._target_": "ssl_medsam2.engines.sam2_predictor.InMemoryVideoPredictor",
        "model.sam_mask_decoder_extra_args": {"dynamic_multimask_via_stability": True,
                                              "dynamic_multimask_stability_delta": 0.05,
                                              "dynamic_multimask_stability_thresh": 0.98},
        "model.binarize_mask_from_pts_for_mem_enc": True,
        # hole filling needs sam2's optional CUDA extension; without it SAM2 would warn on every frame
        "model.fill_hole_area": 8 if has_sam2_cuda_ext() else 0,
    })
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    OmegaConf.resolve(cfg)
    if ckpt is None:
        log.warning("SAM2 with RANDOM weights (checkpoint: none): outputs are meaningless as segmentations; "
                    "use only to test mechanics")
        torch.manual_seed(settings.seed)
    model = instantiate(cfg.model, _recursive_=True)
    if ckpt is not None:
        sd = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        sd = sd.get("model", sd)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{ckpt} does not fit model '{spec.name}': missing keys {missing[:5]}..., "
                               f"unexpected keys {unexpected[:5]}...")
        log.info("loaded SAM2 weights %s", ckpt)
    model = model.to(device).eval()
    info = {"model": spec.name, "image_size": int(model.image_size),
            "weights": str(ckpt) if ckpt else "RANDOM", "random_weights": ckpt is None,
            "max_cond_frames_in_attn": int(model.max_cond_frames_in_attn)}
    return model, info
