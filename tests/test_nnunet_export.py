"""nnU-Net dataset export: nnU-Net's own integrity check, geometry, ignore label from entropy."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from nnunet_helpers import make_tiny_chaos
from ssl_medsam2.config import load_config
from ssl_medsam2.io import list_volumes
from ssl_medsam2.nnunet.export import export_dataset, verify


@pytest.fixture(scope="module")
def tiny(chaos_dir, tmp_path_factory):
    return make_tiny_chaos(chaos_dir, tmp_path_factory.mktemp("tiny_export"))


def _inputs(tiny):
    root = tiny["root"]
    return list_volumes(root / "images"), list_volumes(root / "labels"), list_volumes(root / "pseudo")


def test_export_passes_nnunet_integrity_check_and_keeps_geometry(tiny, tmp_path):
    images, labels, pseudo = _inputs(tiny)
    names = "input.class_names={1: liver, 2: right_kidney, 3: left_kidney, 4: spleen}"
    ds = export_dataset(tmp_path / "raw", images, labels, pseudo, [1, 2, 3, 4], load_config(overrides=[names]))
    verify(ds, 1)  # raises on any problem
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["numTraining"] == 4 and dj["file_ending"] == ".nii.gz"
    assert dj["labels"] == {"background": 0, "liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
    assert dj["channel_names"] == {"0": "MRI"}
    assert {v["source"] for v in dj["ssl_medsam2_cases"].values()} == {"ground_truth", "pseudo_label"}
    for case in tiny["cases"]:  # canonical (RAS) storage, same physical grid, same voxels
        src = nib.as_closest_canonical(nib.load(str(images[case])))
        for out in (nib.load(str(ds / "labelsTr" / f"{case}.nii.gz")),
                    nib.load(str(ds / "imagesTr" / f"{case}_0000.nii.gz"))):
            assert np.allclose(out.affine, src.affine) and out.shape == src.shape
        assert np.allclose(np.asarray(nib.load(str(ds / "imagesTr" / f"{case}_0000.nii.gz")).dataobj),
                           np.asarray(src.dataobj))
        truth = np.asarray(nib.as_closest_canonical(nib.load(str((labels | pseudo)[case]))).dataobj)
        assert np.array_equal(np.asarray(nib.load(str(ds / "labelsTr" / f"{case}.nii.gz")).dataobj), truth)


def test_ignore_label_exactly_where_pseudo_label_entropy_is_high(tiny, tmp_path):
    images, labels, pseudo = _inputs(tiny)
    entropy = {}
    rng = np.random.default_rng(0)
    for case, p in pseudo.items():  # 4D (classes last), as pseudo_label writes it
        img = nib.load(str(p))
        ent = rng.uniform(0, 0.4, size=img.shape + (4,)).astype(np.float32)
        ent[8:20, 10:22, 5:15, 2] = 0.9  # one uncertain block in one class channel
        entropy[case] = tmp_path / f"{case}_entropy.nii.gz"
        nib.save(nib.Nifti1Image(ent, img.affine), str(entropy[case]))
    cfg = load_config(overrides=["nnunet.ignore_entropy_threshold=0.5"])
    ds = export_dataset(tmp_path / "raw", images, labels, pseudo, [1, 2, 3, 4], cfg, entropy=entropy)
    verify(ds, 1)
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"]["ignore"] == 5
    for case in tiny["unlabelled"]:
        out = np.asarray(nib.load(str(ds / "labelsTr" / f"{case}.nii.gz")).dataobj)
        ref = nib.load(str(pseudo[case]))
        high = np.zeros(ref.shape, np.uint8)
        high[8:20, 10:22, 5:15] = 1  # stored like the pseudo label; the export is canonical
        high = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(high, ref.affine)).dataobj).astype(bool)
        assert np.array_equal(out == 5, high)
        src = np.asarray(nib.as_closest_canonical(ref).dataobj)
        assert np.array_equal(out[~high], src[~high])  # everything else is the pseudo label
        assert dj["ssl_medsam2_cases"][case]["ignored_voxels"] == int(high.sum())
    for case in tiny["labelled"]:  # ground truth is never ignored
        out = np.asarray(nib.load(str(ds / "labelsTr" / f"{case}.nii.gz")).dataobj)
        assert (out == 5).sum() == 0


def test_short_schedule_trainer_is_found_by_name_like_nnunet_does():
    from ssl_medsam2.nnunet.trainers import find_trainer, trainer_name

    name = trainer_name(3, 7, 2)
    cls = find_trainer(name)
    assert cls.__name__ == name and (cls.EPOCHS, cls.ITERATIONS, cls.VAL_ITERATIONS) == (3, 7, 2)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    assert issubclass(cls, nnUNetTrainer)
    with pytest.raises(ValueError):
        trainer_name(0, 1, 1)
