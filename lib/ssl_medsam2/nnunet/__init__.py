"""FSL-nnUNet: nnU-Net v2 trained on labels + pseudo labels, round after round (see :mod:`.rounds`).

Modules: :mod:`.export` (nnU-Net raw dataset, ignore label), :mod:`.trainers` (short schedules nnU-Net
finds by name), :mod:`.train` (plan, preprocess, train), :mod:`.predict` (model on volumes/folders),
:mod:`.rounds` (the resumable loop), :mod:`.settings` (the typed ``nnunet:`` section every step reads).
nnunetv2 is imported only inside functions.
"""

import warnings

# MONAI (imported by nnU-Net's stack) uses torch.jit.interface at import; torch >= 2.9 warns about it on
# every run. Nothing a user of this package can act on: keep it off the console.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated")
