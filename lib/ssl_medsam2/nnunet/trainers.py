"""How nnU-Net finds our short-schedule trainers by name, at training AND prediction time.

nnU-Net stores the trainer's class name in every checkpoint and looks the class up again by name
(``recursive_find_trainer_class_by_name``) before it can rebuild the network for prediction. It
searches its own ``nnunetv2.training.nnUNetTrainer`` package, then every folder listed in the
``nnUNet_extTrainer`` environment variable. We use that documented extension point rather than
writing files into the installed nnunetv2 package (which may be read-only, is shared by every
user of the environment, and is lost on reinstall): :func:`register` appends the small folder
``nnunet_ext/`` (one module, depending on nnunetv2 only) to ``nnUNet_extTrainer``.

The schedule lives in the class name (``nnUNetTrainerSSL_<E>ep_<I>it_<V>val``, resolved on demand
by that module), so any schedule is findable without generating code, and a model folder says
how it was trained. Outside this library, ``export nnUNet_extTrainer=<this folder>/nnunet_ext``
makes ``nnUNetv2_train`` / ``nnUNetv2_predict`` accept the same names.
"""

from __future__ import annotations

import os
from pathlib import Path

EXT_TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_ext"
#: the environment variable our trainer class reads its checkpoint interval from (nnunet_ext/ imports
#: nothing of this package, so it spells the same name)
CHECKPOINT_EVERY_ENV = "SSL_MEDSAM2_CHECKPOINT_EVERY"


def trainer_name(epochs: int, iterations_per_epoch: int, val_iterations: int) -> str:
    """The class name nnU-Net resolves to a trainer with this schedule."""
    for what, v in (("epochs", epochs), ("iterations_per_epoch", iterations_per_epoch),
                    ("val_iterations", val_iterations)):
        if int(v) < 1:
            raise ValueError(f"nnunet.{what} must be >= 1, got {v}")
    return f"nnUNetTrainerSSL_{int(epochs)}ep_{int(iterations_per_epoch)}it_{int(val_iterations)}val"


def register() -> None:
    """Put ``nnunet_ext/`` on ``nnUNet_extTrainer`` (idempotent; keeps what the user set)."""
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if str(EXT_TRAINER_DIR) not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [str(EXT_TRAINER_DIR)])


def find_trainer(name: str):
    """The trainer class, looked up exactly the way nnU-Net's own scripts do."""
    register()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(name)
