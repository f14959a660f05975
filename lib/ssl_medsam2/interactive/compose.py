"""From one organ's corrected mask to the label an annotator is shown, so that a click never has side
effects they did not ask for.

Rules (why: a person must be able to predict what a click does):

- only the organ being edited changes, and only inside the ROI when the client sent one;
- other organs are never relabelled by the engine's growth: their voxels join the edited organ only
  where they are connected to a foreground click (or scribble) of it, i.e. where the annotator pointed;
- everything is recomputed from the base label plus every click of the request (no hidden state).
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .requests import Edit

_FULL = np.ones((3, 3, 3), dtype=bool)


def keep_other_organs(mask: np.ndarray, label: np.ndarray, class_id: int, foreground: np.ndarray,
                      fg_scribble: np.ndarray | None = None) -> np.ndarray:
    """``mask`` without the voxels of other organs in ``label``, except the 26-connected parts of them that
    a foreground click (or foreground scribble) of this organ lies in."""
    others = mask & (label != 0) & (label != class_id)
    if not others.any():
        return mask
    comp, _ = ndimage.label(others, structure=_FULL)
    hit = {int(comp[tuple(p)]) for p in np.asarray(foreground).reshape(-1, 3)}
    if fg_scribble is not None:
        hit |= {int(v) for v in np.unique(comp[fg_scribble & others])}
    hit.discard(0)
    taken = np.isin(comp, sorted(hit)) if hit else np.zeros_like(others)
    return mask & ~(others & ~taken)


def within_box(mask: np.ndarray, base: np.ndarray, box: Sequence[slice] | None) -> np.ndarray:
    """``mask`` inside ``box``, ``base`` outside it (the ROI a client placed bounds every change)."""
    if box is None:
        return mask
    out = np.asarray(base, dtype=bool).copy()
    out[tuple(box)] = mask[tuple(box)]
    return out


def put_organ(label: np.ndarray, class_id: int, mask: np.ndarray) -> np.ndarray:
    """``label`` with organ ``class_id`` replaced by ``mask`` (callers have already protected other organs)."""
    out = label.copy()
    out[(out == class_id) & ~mask] = 0
    out[mask] = class_id
    return out


def organ_mask(prepared, label: np.ndarray, edit: Edit, *, fg_scribble: np.ndarray | None = None,
               bg_scribble: np.ndarray | None = None, box: Sequence[slice] | None = None,
               settings: Mapping[str, Any] | None = None, correct: Callable | None = None,
               trusted: Collection[int] = (), appearance=None) -> np.ndarray:
    """The edited organ's mask: the engine's correction of ``label == edit.class_id`` by the clicks /
    scribbles, other organs protected, bounded by ``box``. ``trusted``: the class ids whose base is a final
    label or passed the quality gate (held to more firmly; see :func:`ssl_medsam2.interactive.correct`).
    ``appearance``: the organ looks learned from the labelled images (:class:`.appearance.AppearanceModel`)."""
    if correct is None:
        from . import correct
    base = label == edit.class_id
    if not len(edit.foreground) and not len(edit.background) and fg_scribble is None and bg_scribble is None:
        return base
    mask = np.asarray(correct(prepared, base, edit.foreground.tolist(), edit.background.tolist(),
                              fg_scribble=fg_scribble, bg_scribble=bg_scribble, settings=settings,
                              base_trusted=edit.class_id in trusted, **_look(appearance, edit.class_id)), dtype=bool)
    if mask.shape != base.shape:
        raise ValueError(f"the correction engine returned shape {mask.shape} for a {base.shape} volume")
    mask = keep_other_organs(mask, label, edit.class_id, edit.foreground, fg_scribble)
    return within_box(mask, base, box)


def _look(appearance, class_id: int) -> dict:
    """The ``look`` keyword for the engine: the organ's learned look, when there is one."""
    look = appearance.looks.get(int(class_id)) if appearance is not None else None
    return {"look": look} if look is not None else {}


def corrected_label(prepared, label: np.ndarray, edits: Sequence[Edit], *, box: Sequence[slice] | None = None,
                    settings: Mapping[str, Any] | None = None, correct: Callable | None = None,
                    trusted: Collection[int] = (), appearance=None) -> np.ndarray:
    """``label`` (class ids, canonical order) with every organ edit applied in turn; an edit with class id
    0 (background clicks alone) corrects each organ one of its points lies in. ``trusted``, ``appearance``: as
    for :func:`organ_mask`."""
    out = np.asarray(label).copy()
    done = set()
    for e in edits:
        if e.class_id:
            out = put_organ(out, e.class_id, organ_mask(prepared, out, e, box=box, settings=settings, correct=correct,
                                                        trusted=trusted, appearance=appearance))
            done.add(e.class_id)
    for e in edits:
        if e.class_id == 0 and len(e.background):
            hit = sorted({int(out[tuple(p)]) for p in e.background} - {0} - done)
            for cid in hit:
                out = put_organ(out, cid, organ_mask(prepared, out, Edit(cid, background=e.background), box=box,
                                                     settings=settings, correct=correct, trusted=trusted,
                                                     appearance=appearance))
    return out
