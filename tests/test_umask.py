"""Every file the commands write follows the user's umask (0644 under umask 022), like any ordinary file.

Why: outputs used to be mkstemp's private 0600, so on a shared site (or a server running as another
user) nobody else could read the pseudo labels, metrics, models or predictions.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nnunet_helpers import TINY_SCHEDULE, make_tiny_chaos

pytestmark = pytest.mark.slow


def _modes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode))
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_files_from_every_command_honour_the_umask(chaos_dir, tmp_path):
    from ssl_medsam2.cli import main

    tiny = make_tiny_chaos(chaos_dir, tmp_path / "data")
    root = tiny["root"]
    fast_atlas = ["atlas.working_spacing=[0,0,0]", "atlas.deformable=none", "atlas.affine_iterations=10",
                  "atlas.affine_shrink=[1]", "atlas.affine_smooth_mm=[0]", "atlas.fusion=mean"]
    tiny_run = TINY_SCHEDULE + ["nnunet.max_rounds=1"]
    sets = lambda items: [a for s in items for a in ("--set", s)]  # noqa: E731
    old = os.umask(0o022)
    try:
        outs = {
            "pseudo-label": (["pseudo-label", "--engine", "atlas", "--images", root / "images", "--labels",
                              root / "labels", *sets(fast_atlas)], tmp_path / "pseudo", "--out"),
            "evaluate": (["evaluate", "--pred", tmp_path / "pseudo" / "labels", "--gt", root / "truth"],
                         tmp_path / "eval", "--out"),
            "run": (["run", "--images", root / "images", "--labels", root / "labels", "--pseudo-labels",
                     tmp_path / "pseudo", *sets(tiny_run)], tmp_path / "run", "--work"),
            "predict": (["predict", "--model", tmp_path / "run", "--images", root / "images", "--device", "cpu",
                         *sets(TINY_SCHEDULE)], tmp_path / "pred", "--out"),
        }
        for name, (args, out, flag) in outs.items():
            assert main([str(a) for a in [*args, flag, out]]) == 0, name
    finally:
        os.umask(old)
    for name, (_, out, _) in outs.items():
        modes = _modes(out)
        assert modes, f"{name} wrote nothing to {out}"
        wrong = {p: m for p, m in modes.items() if m != "0o644"}
        assert not wrong, f"{name}: files not 0644 under umask 022: {wrong}"
