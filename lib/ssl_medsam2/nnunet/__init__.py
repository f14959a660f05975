"""FSL-nnUNet: nnU-Net v2 trained on labels + pseudo labels, round after round (see :mod:`.rounds`).

Modules: :mod:`.export` (nnU-Net raw dataset, ignore label), :mod:`.trainers` (short schedules nnU-Net
finds by name), :mod:`.train` (plan, preprocess, train), :mod:`.predict` (model on volumes/folders),
:mod:`.rounds` (the resumable loop), :mod:`.settings` (the typed ``nnunet:`` section every step reads).
nnunetv2 is imported only inside functions.
"""
