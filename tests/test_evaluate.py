"""`ssl-medsam2 evaluate`: MONAI Dice / HD95 against hand-computed values, files, report, errors."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from ssl_medsam2 import report
from ssl_medsam2.cli import main
from ssl_medsam2.config import load_config
from ssl_medsam2.evaluate import evaluate_folders
from ssl_medsam2.metrics import dice, dice_hd95, hd95
from ssl_medsam2.io import InputError
from ssl_medsam2.preprocess import IntensityConfig
from ssl_medsam2.report import pick_cases


def test_dice_of_shifted_boxes_matches_hand_count():
    gt = np.zeros((12, 12, 12), bool)
    pred = np.zeros_like(gt)
    gt[2:6, 2:6, 2:6] = True  # 64 voxels
    pred[3:7, 2:6, 2:6] = True  # shifted one voxel along x: 48 shared
    d, _ = dice_hd95(pred, gt, (1.0, 1.0, 1.0))
    assert d == pytest.approx(2 * 48 / 128)


def test_hd95_uses_spacing():
    gt = np.zeros((8, 8, 8), bool)
    pred = np.zeros_like(gt)
    gt[2, 2, 2] = True
    pred[2, 2, 5] = True  # 3 voxels apart along z, 2 mm each
    d, hd = dice_hd95(pred, gt, (1.0, 1.0, 2.0))
    assert d == 0.0 and hd == pytest.approx(6.0)
    # two predicted voxels: directed distances pred->gt are 0 and 3 * 1.5 = 4.5 mm, gt->pred is 0;
    # HD95 = max of the two directed 95th percentiles = 0.95 * 4.5 (linear percentile of [0, 4.5])
    pred = np.zeros_like(gt)
    pred[2, 2, 2] = pred[2, 5, 2] = True
    d, hd = dice_hd95(pred, gt, (1.0, 1.5, 1.0))
    assert d == pytest.approx(2 * 1 / 3)
    assert hd == pytest.approx(np.percentile([0.0, 4.5], 95))
    assert (d, hd) == (dice(pred, gt), hd95(pred, gt, (1.0, 1.5, 1.0)))  # the one-pass pair = the two metrics


def test_empty_mask_conventions():
    z = np.zeros((5, 5, 5), bool)
    one = z.copy()
    one[2, 2, 2] = True
    assert dice_hd95(z, z, (1, 1, 1)) == (1.0, 0.0)
    assert dice_hd95(one, z, (1, 1, 1)) == (0.0, None)
    assert dice_hd95(z, one, (1, 1, 1)) == (0.0, None)
    assert dice_hd95(one, one, (1, 1, 1)) == (1.0, 0.0)


def test_pick_cases_best_median_worst():
    per_case = {n: {"mean_dice": d} for n, d in [("a", 0.9), ("b", 0.5), ("c", 0.7), ("d", 0.2), ("e", 0.6)]}
    assert pick_cases(per_case) == [("best", "a"), ("median", "e"), ("worst", "d")]
    assert pick_cases({"x": {"mean_dice": 1.0}}) == [("best", "x")]


@pytest.fixture()
def pred_gt(small_chaos, tmp_path):
    """Ground truth = three real CHAOS labels; predictions = the same with known damage."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for c in ("chaos_01", "chaos_02", "chaos_03"):
        img = nib.load(str(small_chaos / "labelsTr" / f"{c}.nii.gz"))
        lab = np.asarray(img.dataobj).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, img.affine), str(gt_dir / f"{c}.nii.gz"))
        pred = lab.copy()
        if c == "chaos_02":
            pred[pred == 4] = 0  # spleen missed entirely
        if c == "chaos_03":
            pred = np.roll(pred, 2, axis=0)  # everything shifted by 2 voxels
        nib.save(nib.Nifti1Image(pred, img.affine), str(pred_dir / f"{c}.nii.gz"))
    return pred_dir, gt_dir, small_chaos / "imagesTr"


def test_evaluate_folders_writes_csv_json_png(pred_gt, tmp_path):
    pred_dir, gt_dir, images = pred_gt
    out = tmp_path / "eval"
    r = evaluate_folders(pred_dir, gt_dir, out, class_names={1: "liver", 4: "spleen"}, images_dir=images,
                         intensity=IntensityConfig.from_config(load_config()))
    assert r["classes"] == [1, 2, 3, 4] and r["n_cases"] == 3
    assert r["per_case"]["chaos_01"]["mean_dice"] == 1.0
    assert r["per_case"]["chaos_02"]["classes"]["spleen"] == {"dice": 0.0, "hd95_mm": None}
    assert r["per_case"]["chaos_02"]["classes"]["liver"]["dice"] == 1.0
    shifted = r["per_case"]["chaos_03"]["classes"]["liver"]
    assert 0.5 < shifted["dice"] < 1.0 and shifted["hd95_mm"] == pytest.approx(2 * 5.0, abs=0.01)  # 2 x 5 mm voxels
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 12 and set(rows[0]) == {"case", "class_id", "class_name", "dice", "hd95_mm", "gt_voxels",
                                                "pred_voxels"}
    assert json.loads((out / "metrics.json").read_text())["per_class"]["spleen"]["dice"]["min"] == 0.0
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(out / "report.png"))
    assert pixels.shape[0] >= 800 and pixels.shape[1] >= 1200 and pixels[..., :3].std() > 0.05


def test_evaluate_cli_and_errors(pred_gt, tmp_path, capsys):
    pred_dir, gt_dir, images = pred_gt
    out = tmp_path / "cli"
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out), "--classes", "1",
                 "--no-report"]) == 0
    text = capsys.readouterr().out
    # no dataset.json and no input.class_names: neutral names, never another dataset's organs
    assert "class_1: Dice mean" in text and "liver" not in text and not (out / "report.png").exists()
    assert [r["class_id"] for r in csv.DictReader(open(out / "metrics.csv"))] == ["1", "1", "1"]
    # the ground truth's dataset.json names the classes
    (gt_dir / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out), "--classes", "1",
                 "--no-report"]) == 0
    assert "liver: Dice mean" in capsys.readouterr().out
    # a prediction on another grid is refused with the file named
    bad = tmp_path / "bad"
    bad.mkdir()
    img = nib.load(str(gt_dir / "chaos_01.nii.gz"))
    aff = img.affine.copy()
    aff[0, 3] += 10
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), str(bad / "chaos_01.nii.gz"))
    with pytest.raises(InputError, match="affine"):
        evaluate_folders(bad, gt_dir, None)
    assert main(["evaluate", "--pred", str(tmp_path / "nowhere"), "--gt", str(gt_dir), "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no prediction"):
        evaluate_folders(empty, gt_dir, None)


def test_evaluate_cli_report_windows_with_the_run_config(pred_gt, tmp_path, monkeypatch):
    """--set input.* reaches the report's image background (it used to read the default YAML)."""
    pred_dir, gt_dir, images = pred_gt
    seen = []
    real = report.scale_to_uint8_range
    monkeypatch.setattr(report, "scale_to_uint8_range", lambda a, icfg: seen.append(icfg) or real(a, icfg))
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(tmp_path / "e"),
                 "--images", str(images), "--classes", "1", "--set", "input.mri_percentiles=[2,98]"]) == 0
    assert seen and all(icfg.mri_percentiles == (2.0, 98.0) for icfg in seen)
    assert (tmp_path / "e" / "report.png").exists()
