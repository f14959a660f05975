"""Short-schedule nnU-Net trainers, found by nnU-Net through ``nnUNet_extTrainer``.

This file is NOT part of the ``ssl_medsam2`` package on purpose: nnU-Net imports every module of
an ``nnUNet_extTrainer`` folder as a top-level module, so this folder holds only this one module,
which depends on nnunetv2 alone. :mod:`ssl_medsam2.nnunet.trainers` puts the folder on that path.

Any name of the form ``nnUNetTrainerSSL_<E>ep_<I>it_<V>val`` resolves (module ``__getattr__``) to a
subclass of the stock ``nnUNetTrainer`` that trains E epochs of I iterations with V validation
iterations. The network, loss, augmentation and checkpoints are the stock ones, so a model trained
with any schedule loads in a stock ``nnUNetPredictor`` / ``nnUNetv2_predict`` as long as this folder
is on ``nnUNet_extTrainer``.
"""

import os
import re

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

_NAME = re.compile(r"^nnUNetTrainerSSL_(\d+)ep_(\d+)it_(\d+)val$")
#: epochs between checkpoint_latest.pth writes; ssl_medsam2 sets it from nnunet.checkpoint_every (an
#: environment variable, so nnUNetv2_train's DDP processes see it too)
CHECKPOINT_EVERY_ENV = "SSL_MEDSAM2_CHECKPOINT_EVERY"


class nnUNetTrainerSSL(nnUNetTrainer):
    """Stock nnU-Net training with a schedule from the class attributes and an epoch callback."""

    EPOCHS = 1000
    ITERATIONS = 250
    VAL_ITERATIONS = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.EPOCHS
        self.num_iterations_per_epoch = self.ITERATIONS
        self.num_val_iterations_per_epoch = self.VAL_ITERATIONS
        # checkpoint_latest.pth every epoch unless set (nnU-Net: every 50), so a stopped round resumes
        # where it was (nnUNetv2_train --c) instead of from epoch 0
        self.save_every = int(os.environ.get(CHECKPOINT_EVERY_ENV, "1"))
        # called as epoch_callback(trainer) after every epoch (progress bars, MONAI Label train_stats)
        self.epoch_callback = None

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.epoch_callback is not None:
            self.epoch_callback(self)


def __getattr__(name):
    m = _NAME.match(name)
    if m is None:
        raise AttributeError(name)
    epochs, iterations, val_iterations = (int(g) for g in m.groups())
    if epochs < 1 or iterations < 1 or val_iterations < 1:
        raise AttributeError(f"{name}: epochs, iterations and validation iterations must be >= 1")
    cls = type(name, (nnUNetTrainerSSL,), {"EPOCHS": epochs, "ITERATIONS": iterations,
                                           "VAL_ITERATIONS": val_iterations, "__module__": __name__})
    globals()[name] = cls
    return cls
