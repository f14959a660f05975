"""Pseudo labels computed ahead of the annotators: a store of per-image results keyed by what produced
them (:mod:`.store`) and the background queue that keeps them current (:mod:`.queue`). No MONAI Label
here: the app supplies what to compute, in which order, and when a background job may start."""

from .queue import PseudoQueue
from .store import PseudoStore, file_fingerprint, producer_digest, producer_settings, stored_pseudo_label

__all__ = ["PseudoQueue", "PseudoStore", "file_fingerprint", "producer_digest", "producer_settings", "stored_pseudo_label"]
