"""What a run tells people: one progress line, the round curves, and the loud lines of the quality gate.

Progress events (dicts with a ``stage``) come from the loop and from nnU-Net's epoch callback;
:class:`RunProgress` turns them into the fields that both the console line (:class:`ProgressLine`,
one tqdm bar) and MONAI Label's ``train_stats`` show: round k/K, epoch e/E, iterations per second,
ETA, last train loss and nnU-Net's pseudo Dice.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from ..io import atomic_write

log = logging.getLogger(__name__)

STAGE_WORDS = {"pseudo_label": "few-shot pseudo labels", "export": "export", "plan": "plan + preprocess",
               "speed": "measuring speed", "train": "train", "predict": "predict", "round_done": "round done",
               "done": "done"}


class RunProgress:
    """Progress events -> the fields every view shows (pure bookkeeping, no output)."""

    def __init__(self):
        self.fields: dict = {"round": 0, "max_rounds": None, "stage": "start", "epoch": 0, "total_epochs": None,
                             "it_per_s": None, "eta_s": None, "eta_run_s": None, "train_loss": None,
                             "pseudo_dice": None}
        self._epoch_s: float | None = None
        self._eta_at: tuple | None = None  # (when, eta_s, eta_run_s) as last computed

    def update(self, event: dict) -> dict:
        """Fold one event in. ``{"tick": True}`` (every few seconds, :class:`Ticker`) only lets time pass: the
        ETAs count down between epochs, so no view freezes through a long phase."""
        f = self.fields
        now = time.monotonic()
        if event.get("tick"):
            if self._eta_at is not None:
                gone = now - self._eta_at[0]
                f["eta_s"] = round(max(0.0, self._eta_at[1] - gone), 1)
                f["eta_run_s"] = None if self._eta_at[2] is None else round(max(0.0, self._eta_at[2] - gone), 1)
            return dict(f)
        if event.get("stage") is not None and event["stage"] != f["stage"]:
            f["done"] = f["total"] = None  # a stage's counts are its own
        for k in ("round", "max_rounds", "stage", "epoch", "total_epochs", "train_loss", "pseudo_dice", "done",
                  "total", "case", "eta_s"):
            if event.get(k) is not None:
                f[k] = event[k]
        if event.get("stage") == "train" and event.get("epoch_s"):
            self._epoch_s = float(event["epoch_s"])
            its = event.get("iterations_per_epoch")
            f["it_per_s"] = round(float(its) / self._epoch_s, 3) if its else None
            left = max(0, int(f["total_epochs"] or 0) - int(f["epoch"] or 0))
            f["eta_s"] = round(left * self._epoch_s, 1)
            rounds_left = max(0, int(f["max_rounds"] or 0) - int(f["round"] or 0))
            f["eta_run_s"] = round(f["eta_s"] + rounds_left * int(f["total_epochs"] or 0) * self._epoch_s, 1)
        if event.get("stage") in ("round_done", "done"):
            f["eta_s"] = 0.0
        self._eta_at = None if f["eta_s"] is None else (now, f["eta_s"], f["eta_run_s"])
        return dict(f)


def _fmt_s(s) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressLine:
    """One tqdm line on the console for the whole run; nnU-Net's own output goes to its log file."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.state = RunProgress()
        self._bar = None
        self._key = None

    def __call__(self, event: dict) -> dict:
        f = self.state.update(event)
        if not self.enabled or f["stage"] == "pseudo_label":  # round 0 draws its own pseudo-label bar
            return f
        from tqdm.auto import tqdm

        stage = f["stage"]
        if event.get("tick"):  # only the clock moved: redraw (elapsed time, ETA)
            if self._bar is not None:
                self._bar.refresh()
            return f
        if stage in ("round_done", "done"):  # the round's lines are complete; the log says the rest
            self.close()
            self._key = None
            return f
        total = f["total_epochs"] if stage == "train" else f.get("total") if stage == "predict" else None
        key = (f["round"], stage)
        fmt = ("{desc}{percentage:3.0f}%|{bar:20}|{postfix} [{elapsed}]" if stage == "train" else
               "{desc}{n_fmt}/{total_fmt} [{elapsed}]" if total else "{desc}{postfix} [{elapsed}]")
        if key != self._key or self._bar is None:  # each stage its own line: a finished one stays as it ended
            self.close()
            self._key = key
            self._bar = tqdm(total=total, dynamic_ncols=True, leave=True, bar_format=fmt,
                             desc=f"round {f['round']}/{f['max_rounds']} {STAGE_WORDS.get(stage, stage)}")
        elif total and self._bar.total != total:
            self._bar.total = total
            self._bar.bar_format = fmt
        self._bar.set_description(f"round {f['round']}/{f['max_rounds']} {STAGE_WORDS.get(stage, stage)}")
        n = f["epoch"] if stage == "train" else f.get("done") if stage == "predict" else None
        if n is not None and total:
            self._bar.n = int(n)
        post = []
        if stage == "train":
            post.append(f"epoch {f['epoch']}/{f['total_epochs']}")
            if f["it_per_s"] is not None:
                post.append(f"{f['it_per_s']:.2f} it/s")
            if f["train_loss"] is not None:
                post.append(f"loss {f['train_loss']:.3f}")
            if f["pseudo_dice"] is not None:
                post.append(f"pseudo-Dice {f['pseudo_dice']:.3f}")
            post.append(f"ETA round {_fmt_s(f['eta_s'])}, run {_fmt_s(f['eta_run_s'])}")
        elif stage in ("export", "plan", "speed") and f.get("eta_s"):
            post.append(f"ETA round {_fmt_s(f['eta_s'])}")
        self._bar.set_postfix_str(", ".join(post), refresh=False)
        self._bar.refresh()
        return f

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Ticker:
    """Calls ``report({"tick": True})`` every ``every_s`` seconds from a daemon thread while a run works, so
    a phase without events (export, plan + preprocess, loading a checkpoint) still shows its clock moving
    and MONAI Label's ``train_stats`` (total_time, eta_s) never freezes. A context manager."""

    def __init__(self, report, every_s: float):
        self.report, self.every_s = report, float(every_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-ticker", daemon=True)

    def _run(self):
        while not self._stop.wait(self.every_s):
            try:
                self.report({"tick": True})
            except Exception:  # a view that fails must never stop the run
                log.debug("progress tick failed", exc_info=True)

    def start(self) -> "Ticker":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.every_s)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def plot_curves(history: list[dict], path: Path, round0_gate: float | None = None) -> Path:
    """Round-to-round change, and labelled-case fit + held-out gate Dice per round, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # nnU-Net imports seaborn, which restyles matplotlib globally (huge fonts): draw with the defaults
    with matplotlib.rc_context(rc=matplotlib.rcParamsDefault):
        rounds = [h["round"] for h in history]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        axes[0].plot(rounds, [h["change"] for h in history], "o-", label="change")
        if history and history[-1].get("min_change") is not None:
            axes[0].axhline(history[-1]["min_change"], color="grey", ls="--", label="min_change (stop below)")
        axes[0].set(xlabel="round", ylabel="1 - mean Dice to previous round", title="pseudo-label change",
                    ylim=(0, 1.02))
        axes[0].legend(fontsize=8)
        axes[1].plot(rounds, [h["labelled_dice"] for h in history], "o-",
                     label="labelled cases (in the training set: fit)")
        gate = [h.get("gate_dice") for h in history]
        if any(g is not None for g in gate):
            xs, ys = ([0] + rounds, [round0_gate] + gate) if round0_gate is not None else (rounds, gate)
            axes[1].plot(xs, [np.nan if g is None else g for g in ys], "D-", color="C3",
                         label="held-out gate case (decides deployment)")
            for h in history:
                if h.get("deployed") is False:
                    axes[1].annotate("not deployed", (h["round"], h["gate_dice"]), fontsize=8, color="C3",
                                     xytext=(4, -12), textcoords="offset points")
        ema = [h.get("nnunet_ema_pseudo_dice") for h in history]
        if any(e is not None for e in ema):
            axes[1].plot(rounds, [np.nan if e is None else e for e in ema], "s--", label="nnU-Net EMA pseudo Dice")
        axes[1].set(xlabel="round", ylabel="Dice", ylim=(0, 1.02), title="Dice per round")
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.set_xticks(sorted(set(rounds) | ({0} if round0_gate is not None else set())))
            ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
    return path


def loud(message: str) -> None:
    """A line nobody should miss (quality-gate refusals): the log at WARNING, framed."""
    bar = "!" * min(100, len(message))
    log.warning("\n%s\n%s\n%s", bar, message, bar)
