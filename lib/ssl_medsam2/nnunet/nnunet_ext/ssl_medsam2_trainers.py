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
import threading

import numpy as np
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

        # losses of the iterations an interrupted epoch already ran (from checkpoint_latest.pth)
        self._resume_outputs = []

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.epoch_callback is not None:
            self.epoch_callback(self)

    def run_training(self):
        """nnU-Net's loop, plus: Ctrl-C saves ``checkpoint_latest.pth`` *inside* the epoch (weights, optimizer,
        iterations done), so a stop loses the iteration in progress, not the epoch; a resumed epoch runs only
        the iterations it had left."""
        self.on_train_start()
        try:
            for _ in range(self.current_epoch, self.num_epochs):
                self.on_epoch_start()
                self.on_train_epoch_start()
                train_outputs, self._resume_outputs = list(self._resume_outputs), []
                try:
                    while len(train_outputs) < self.num_iterations_per_epoch:
                        train_outputs.append(self.train_step(next(self.dataloader_train)))
                except KeyboardInterrupt:
                    self.save_mid_epoch(train_outputs)
                    raise
                self.on_train_epoch_end(train_outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = [self.validation_step(next(self.dataloader_val))
                                   for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val_outputs)
                self.on_epoch_end()
        except BaseException:
            self.stop_loaders_quietly()
            raise
        self.on_train_end()

    def stop_loaders_quietly(self) -> None:
        """Stop the augmentation workers after a stop or an error without a second message: no "workers are
        no longer alive", and no traceback from a loader's results thread that was unpacking a batch whose
        worker exited under it (torch's shared tensors then vanish: FileNotFoundError in resource_sharer).
        That batch is dropped anyway; the thread's other exceptions still reach ``threading.excepthook``."""
        loaders = [dl for dl in (getattr(self, "dataloader_train", None), getattr(self, "dataloader_val", None))
                   if hasattr(dl, "_finish")]
        stopping = {getattr(dl, "results_loop_thread", None) for dl in loaders} - {None}
        previous = threading.excepthook

        def quiet(args):
            if args.thread in stopping and issubclass(args.exc_type, (OSError, EOFError)):
                return
            previous(args)

        threading.excepthook = quiet
        try:
            for dl in loaders:
                dl._finish()
        finally:
            threading.excepthook = previous

    def save_mid_epoch(self, train_outputs) -> None:
        """``checkpoint_latest.pth`` of the epoch in progress: this epoch again, from iteration len(outputs)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        path = os.path.join(self.output_folder, "checkpoint_latest.pth")
        tmp = path + ".partial"
        self.current_epoch -= 1  # nnU-Net stores current_epoch + 1 (the next epoch): the one in progress
        try:
            self.save_checkpoint(tmp)
        finally:
            self.current_epoch += 1
        ckpt = torch.load(tmp, map_location="cpu", weights_only=False)
        ckpt["ssl_partial_epoch"] = {"epoch": self.current_epoch,
                                     "train_losses": [float(np.asarray(o["loss"])) for o in train_outputs]}
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
        self.print_to_log_file(f"stopped in epoch {self.current_epoch} after {len(train_outputs)}/"
                               f"{self.num_iterations_per_epoch} iterations: saved {path}")

    def load_checkpoint(self, filename_or_checkpoint):
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(filename_or_checkpoint, str):
            partial = torch.load(filename_or_checkpoint, map_location="cpu",
                                 weights_only=False).get("ssl_partial_epoch")
            if partial and int(partial["epoch"]) == self.current_epoch:
                self._resume_outputs = [{"loss": np.asarray(v)} for v in partial["train_losses"]]

    @property
    def resumed_iterations(self) -> int:
        """Iterations of the current epoch already done before a stop (0 at an epoch boundary)."""
        return len(self._resume_outputs)


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
