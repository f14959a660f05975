"""The MONAI Label trainer (apps/ssl_medsam2 ssl_nnunet) with the quality gate, without a server.

A real LocalDatastore on tiny real CHAOS (4 cases at 32x32 in-plane, 2 with final labels), the atlas
engine for round 0, 1 epoch x 2 iterations: round 1 cannot beat the atlas pseudo labels on the
held-out gate case, so the run keeps round 0, the version is recorded but not promoted, and what
/info -> train_stats shows says why, next to the progress fields of the CLI's line.
"""

from __future__ import annotations

import sys

from conftest import REPO
from nnunet_helpers import make_tiny_chaos

APP = REPO / "apps" / "ssl_medsam2"
sys.path.insert(0, str(APP))


def test_app_run_that_loses_to_round0_is_not_promoted_and_info_says_why(chaos_dir, tmp_path):
    from lib.trainers import SSLNnUNetTrain  # noqa: E402
    from lib.workspace import Workspace  # noqa: E402
    from monailabel.datastore.local import LocalDatastore

    from ssl_medsam2.studies import make_studies

    tiny = make_tiny_chaos(chaos_dir, tmp_path / "tiny")
    studies = tmp_path / "studies"
    make_studies(tiny["root"] / "images", tiny["root"] / "truth", studies, 2)
    ds = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    conf = {"protocol.engine": "atlas", "atlas.demons_iterations": "[20, 10]", "atlas.demons_shrink": "[2, 1]",
            "atlas.organ_matched_pass": "false",
            "nnunet.epochs": "1", "nnunet.iterations_per_epoch": "2", "nnunet.val_iterations": "1",
            "nnunet.max_rounds": "2", "nnunet.min_change": "0", "nnunet.device": "cpu", "nnunet.num_workers": "0",
            "nnunet.num_processes": "1", "nnunet.cpu_threads": "1", "app.state_dir": str(tmp_path / "state")}
    ws = Workspace(str(APP), str(studies), conf, datastore=ds)
    task = SSLNnUNetTrain(ws)
    result = task({}, ds)
    assert result["promoted"] is False and ws.registry.current() is None
    stats = task.stats()
    assert stats["status"] == "DONE" and stats["promoted"] is False
    assert "QUALITY GATE: round 1 NOT deployed" in stats["not_promoted_because"]
    gate = stats["quality_gate"]
    assert gate["deployed_round"] == 0 and gate["cases"] == [tiny["labelled"][-1]] and gate["warning"]
    # the progress fields of the CLI line, from the last training epoch
    assert stats["round"] == 1 and stats["total_epochs"] == 1 and stats["it_per_s"] > 0
    assert stats["train_loss"] is not None and "pseudo_dice" in stats and stats["eta_s"] == 0.0
    version = ws.registry.state()["versions"][0]
    assert version["model_dir"] is None and version["promoted"] is False
    assert version["schedule"]["name"] == "short" and version["quality_gate"]["deployed_round"] == 0
