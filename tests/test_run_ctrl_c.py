"""Ctrl-C during a real ``ssl-medsam2 run`` (a subprocess, SIGINT to its whole process group as a terminal
sends it): one line that says what is kept and the command to resume, no traceback (nnU-Net's augmentation
worker included), exit code 130; the checkpoint saved inside the epoch lets the same command go on from the
iteration it stopped at; and ``predict`` on the stopped run serves round 0, which is deployed meanwhile.

Tiny real CHAOS (tests/nnunet_helpers.py), 2d nnU-Net on CPU: mechanics only, never accuracy.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from conftest import REPO
from nnunet_helpers import TINY_SCHEDULE, make_tiny_chaos
from ssl_medsam2.nnunet.layout import RunLayout

# one epoch long enough to be stopped in the middle: ~10 s on a fast idle 2-core CPU, where 80 iterations
# were already over 5 s after the first epoch's checkpoint (the test then saw a finished round)
ITERATIONS = 200


def _cmd(root, work, *extra):
    sets = [a for o in TINY_SCHEDULE + ["nnunet.epochs=2", f"nnunet.iterations_per_epoch={ITERATIONS}",
                                        "nnunet.num_workers=1", "nnunet.max_rounds=1", *extra] for a in ("--set", o)]
    return [sys.executable, "-m", "ssl_medsam2.cli", "run", "--images", str(root / "images"), "--labels",
            str(root / "labels"), "--work", str(work), "--pseudo-labels", str(root / "pseudo"), *sets]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")])}


def _wait_for(pred, timeout, proc):
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def test_ctrl_c_says_one_line_and_the_same_command_resumes_inside_the_epoch(chaos_dir, tmp_path):
    tiny = make_tiny_chaos(chaos_dir, tmp_path / "tiny")
    root, work = tiny["root"], tmp_path / "work"
    layout = RunLayout(work)
    cmd = _cmd(root, work)
    # a terminal's foreground job: SIGINT at its default even where this test runs with it ignored (a
    # non-interactive shell's background job ignores it, and a child inherits that; Python then never
    # raises KeyboardInterrupt and the run just finishes)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # the first epoch's checkpoint_latest.pth: training is in epoch 2 now; stop a few seconds into it
        assert _wait_for(lambda: any(layout.nnunet_root(1).rglob("checkpoint_latest.pth")), 600, proc), \
            proc.communicate()[1][-3000:]
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err and "background workers" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "stopped (Ctrl-C)" in ln]
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    assert line.startswith("ssl-medsam2 run: stopped (Ctrl-C); kept: round 0 (few-shot pseudo labels), "
                           "round 1's training checkpoint (epoch 2, "), line
    assert "resume with: ssl-medsam2 run --images " in line and f"--work {work}" in line
    assert not layout.model(1).exists()

    # meanwhile round 0 is deployed: predict serves it (given pseudo labels: it says there is no model)
    new = tmp_path / "new"
    new.mkdir()
    shutil.copyfile(root / "images" / f"{tiny['unlabelled'][0]}_0000.nii.gz", new / "q_0000.nii.gz")
    res = subprocess.run([sys.executable, "-m", "ssl_medsam2.cli", "predict", "--model", str(work), "--images",
                          str(new), "--out", str(tmp_path / "pred")], capture_output=True, text=True, env=_env())
    assert res.returncode == 2 and "round 0 is deployed" in res.stderr and "not finished" not in res.stderr

    # the same command goes on inside epoch 2, from the iteration it stopped at
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = [ln for ln in res.stderr.splitlines() if "resuming training from" in ln]
    assert len(resumed) == 1 and "at epoch 1/2, iteration " in resumed[0], res.stderr[-3000:]
    done = int(resumed[0].split("iteration ")[1].split("/")[0])
    assert 0 < done < ITERATIONS
    assert layout.read_final()["round"] == 1 and (layout.model(1) / "fold_all" / "checkpoint_final.pth").exists()


def test_a_results_thread_that_loses_its_batch_while_the_loaders_stop_prints_nothing(capsys):
    """The race behind a rare traceback after Ctrl-C: batchgenerators' results thread is unpacking a batch
    when its worker process exits, and torch's shared tensor is gone (FileNotFoundError). Stopping the
    loaders drops that batch silently; any other error of that thread is still reported."""
    import importlib
    import threading

    from ssl_medsam2.nnunet.trainers import EXT_TRAINER_DIR

    sys.path.insert(0, str(EXT_TRAINER_DIR))
    try:
        trainers = importlib.import_module("ssl_medsam2_trainers")
    finally:
        sys.path.remove(str(EXT_TRAINER_DIR))

    class Loader:
        def __init__(self, error):
            self.stopping = threading.Event()
            self.results_loop_thread = threading.Thread(target=self._loop, args=(error,), daemon=True)
            self.results_loop_thread.start()

        def _loop(self, error):
            self.stopping.wait()  # raises only once the loader is being stopped, as in nnU-Net
            raise error

        def _finish(self):
            self.stopping.set()
            self.results_loop_thread.join()

    seen = []
    previous = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_type)
    try:
        trainer = object.__new__(trainers.nnUNetTrainerSSL)
        trainer.dataloader_train, trainer.dataloader_val = Loader(FileNotFoundError(2, "gone")), None
        trainer.stop_loaders_quietly()
        assert seen == []
        trainer.dataloader_train = Loader(ZeroDivisionError("a real bug"))
        trainer.stop_loaders_quietly()
        assert seen == [ZeroDivisionError]
        assert threading.excepthook is not previous  # the test's own hook is back in place
    finally:
        threading.excepthook = previous
