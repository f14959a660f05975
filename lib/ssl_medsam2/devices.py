"""The one place a device setting (``auto`` / ``cpu`` / ``cuda`` / ``cuda:1``) becomes a torch device.

Why: SAM2, nnU-Net training, prediction and the app all take a device setting; resolving it in one
place means ``auto`` means the same everywhere and asking for CUDA on a machine without it fails up
front with one clear message instead of deep inside a library.
"""

from __future__ import annotations


def resolve_device(name=None):
    """``None`` / ``""`` / ``"auto"`` -> cuda when available else cpu; otherwise that device (checked).

    Accepts a string or a ``torch.device``; returns a ``torch.device`` (``.type`` is ``"cpu"`` or
    ``"cuda"``). Raises ValueError for CUDA on a machine without it.
    """
    import torch

    if name is None or str(name) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available here")
    return dev
