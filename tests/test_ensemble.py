"""Ensemble engine: mean of member probabilities, entropy rises where members disagree."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from ssl_medsam2.config import load_config
from ssl_medsam2.engines import build_engine
from ssl_medsam2.engines.base import Case, EngineResult
from ssl_medsam2.engines.ensemble import EnsembleEngine
from ssl_medsam2.io import load_label_for, load_volume
from ssl_medsam2.pseudo_label import pseudo_label_case, pseudo_label_folder

from conftest import downsample_case

SAM2_RANDOM = ["sam2.checkpoint=none", "sam2.image_size=128", "sam2.n_inserts=1", "sam2.n_supports=1",
               "sam2.device=cpu"]


class FakeEngine:
    """Returns a fixed probability map; records its calls."""

    def __init__(self, name, probs, random_weights=False):
        self.name = name
        self.probs = probs
        self.random_weights = random_weights
        self.calls = 0

    def work_units(self, supports, query, classes):
        return 2

    def predict(self, supports, query, classes, progress=None):
        self.calls += 1
        for _ in range(2):
            if progress:
                progress(1)
        return EngineResult(self.probs.copy(), tuple(classes), 3, {"random_weights": self.random_weights})


class Recorder:
    """Wraps a real engine and keeps its last result, to check what the ensemble did with it."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.name
        self.last = None

    def work_units(self, *a):
        return self.engine.work_units(*a)

    def predict(self, *a, **k):
        self.last = self.engine.predict(*a, **k)
        return self.last


@pytest.fixture(scope="module")
def short_chaos(chaos_dir, tmp_path_factory):
    """chaos_01 and chaos_05 at 64x64 in-plane, 14 slices through the liver (keeps SAM2 on CPU short)."""
    root = tmp_path_factory.mktemp("short_chaos")
    for c, z in (("chaos_01", (16, 30)), ("chaos_05", (12, 26))):
        downsample_case(chaos_dir / "imagesTr" / f"{c}_0000.nii.gz", chaos_dir / "labelsTr" / f"{c}.nii.gz",
                        root / "imagesTr" / f"{c}_0000.nii.gz", root / "labelsTr" / f"{c}.nii.gz", z_range=z)
    return root


@pytest.fixture(scope="module")
def two_cases(short_chaos):
    out = []
    for c in ("chaos_01", "chaos_05"):
        im = load_volume(short_chaos / "imagesTr" / f"{c}_0000.nii.gz")
        out.append(Case(im, load_label_for(im, short_chaos / "labelsTr" / f"{c}.nii.gz")))
    return out


def test_mean_of_members_and_entropy_where_they_disagree(two_cases):
    support, query = two_cases[0], Case(two_cases[1].image)
    shape = (1,) + query.image.shape
    a = np.zeros(shape, np.float32)
    b = np.zeros(shape, np.float32)
    a[0, 10:40, 10:40, 2:12] = 1.0  # both engines agree here ...
    b[0, 10:40, 10:40, 2:12] = 1.0
    a[0, 40:50, 10:40, 2:12] = 1.0  # ... only engine A says foreground here
    ea, eb = FakeEngine("a", a), FakeEngine("b", b, random_weights=True)
    ens = EnsembleEngine([ea, eb])
    ticks = []
    assert ens.work_units([support], query, [1]) == 4
    r = ens.predict([support], query, [1], progress=ticks.append)
    assert len(ticks) == 4 and r.n_runs == 6
    np.testing.assert_allclose(r.probs, (a + b) / 2)
    assert r.meta["random_weights"] is True and set(r.meta["members"]) == {"a", "b"}
    assert 0.5 < r.meta["member_agreement_dice"]["1"] < 1.0
    cfg = load_config(overrides=["input.classes=[1]"])
    out = pseudo_label_case(ens, [support], query, cfg)
    ent = out["entropy"][0]
    assert np.allclose(ent[20, 20, 10], 0.0) and np.isclose(ent[45, 20, 10], 1.0)  # H(0.5) = 1 bit
    # weights are honoured
    r = EnsembleEngine([ea, eb], weights=[3, 1]).predict([support], query, [1])
    np.testing.assert_allclose(r.probs, 0.75 * a + 0.25 * b)
    with pytest.raises(ValueError):
        EnsembleEngine([])
    with pytest.raises(ValueError):
        EnsembleEngine([ea, eb], weights=[1, -1])


def test_ensemble_member_with_wrong_shape_fails_clearly(two_cases):
    support, query = two_cases[0], Case(two_cases[1].image)
    bad = FakeEngine("bad", np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(RuntimeError, match="bad returned probabilities"):
        EnsembleEngine([bad]).predict([support], query, [1])


def test_ensemble_of_random_weight_sam2_and_atlas(short_chaos, two_cases, tmp_path):
    """build_engine('ensemble') combines both real engines; output is their mean, on the query grid."""
    cfg = load_config(overrides=SAM2_RANDOM + ["atlas.demons_iterations=[20, 10]", "atlas.demons_shrink=[2, 1]",
                                               "atlas.organ_matched_pass=false", "input.classes=[1]"])
    ens = build_engine("ensemble", cfg)
    assert isinstance(ens, EnsembleEngine) and [e.name for e in ens.engines] == ["sam2", "atlas"]
    ens.engines = [Recorder(e) for e in ens.engines]
    img_dir, lab_dir = tmp_path / "images", tmp_path / "labels"
    img_dir.mkdir()
    lab_dir.mkdir()
    for c in ("chaos_01", "chaos_05"):
        (img_dir / f"{c}_0000.nii.gz").symlink_to(short_chaos / "imagesTr" / f"{c}_0000.nii.gz")
    (lab_dir / "chaos_01.nii.gz").symlink_to(short_chaos / "labelsTr" / "chaos_01.nii.gz")
    out = tmp_path / "out"
    summaries = pseudo_label_folder(img_dir, lab_dir, out, cfg, engine=ens, show_progress=False)
    (s,) = summaries
    sam2_p, atlas_p = ens.engines[0].last.probs, ens.engines[1].last.probs
    assert sam2_p.shape == atlas_p.shape == (1,) + two_cases[1].image.shape
    prob = np.asarray(nib.load(str(out / "probabilities" / "chaos_05.nii.gz")).dataobj)
    query = two_cases[1].image
    np.testing.assert_allclose(query.in_source_order((sam2_p + atlas_p) / 2)[0], prob[..., 0], atol=1e-6)
    assert s["engine"] == "ensemble" and s["random_weights"] is True
    assert set(s["members"]) == {"sam2", "atlas"}
    src = nib.load(str(short_chaos / "imagesTr" / "chaos_05_0000.nii.gz"))
    lab = nib.load(str(out / "labels" / "chaos_05.nii.gz"))
    assert np.allclose(lab.affine, src.affine, atol=1e-5) and lab.shape == src.shape
    assert b"RANDOM WEIGHTS" in lab.header["descrip"].tobytes()
