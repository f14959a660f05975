"""What an annotator's client sends, read once at the edge: clicks in the image file's voxel index space
become checked, canonical (RAS+) voxel indices; organ names and ids become the app's class ids.

Why here: 3D Slicer and OHIF send points as the image *file's* voxel indices (Slicer: RAS -> IJK of the
volume as loaded; OHIF: cornerstone's ``worldToIndex``, rounded), while the library holds every volume
in canonical order. Converting in one place, with every check a person needs to trust the answer
(inside the volume, whole numbers, a bounded count, a known organ), keeps the engine free of client
formats. Every refusal is an :class:`~ssl_medsam2.io.InputError` whose message says what to send instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..io import InputError, Volume

BACKGROUND = "background"
FG_SCRIBBLES = "foreground_scribbles"
BG_SCRIBBLES = "background_scribbles"


@dataclass(frozen=True)
class Organs:
    """The app's organs in answer order: ``names[n-1]`` is answered as value ``n`` by the label-map
    models (Slicer reads value n as the n-th non-background name of /info's ``labels``; OHIF maps the
    model's ``labels`` ids), ``ids`` are the class ids the stored labels hold."""

    names: tuple[str, ...]
    ids: tuple[int, ...]

    @classmethod
    def from_map(cls, name_to_id: Mapping[str, int]) -> "Organs":
        pairs = sorted(((int(i), str(n)) for n, i in name_to_id.items() if int(i) != 0 and n != BACKGROUND))
        return cls(tuple(n for _, n in pairs), tuple(i for i, _ in pairs))

    def class_id(self, name: str, what: str = "label name") -> int:
        if name not in self.names:
            raise InputError(None, f"unknown {what} {str(name)[:100]!r}; this server's organs: "
                                   f"{', '.join(self.names) or 'none (name them with input.class_names)'}")
        return self.ids[self.names.index(name)]

    def positions(self) -> dict[str, int]:
        """name -> answer value (1..N)."""
        return {n: i + 1 for i, n in enumerate(self.names)}


@dataclass
class Edit:
    """The clicks of one organ, canonical voxel indices (``(n, 3)`` int arrays)."""

    class_id: int
    foreground: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    background: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))


def count_points(params: Mapping[str, Any], keys: Sequence[str]) -> int:
    """How many points the request carries under ``keys`` (for the app's bound, before any work)."""
    return sum(len(params[k]) for k in keys if isinstance(params.get(k), list))


def _whole(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(None, f"'{key}': coordinates must be numbers, got {str(value)[:40]!r}")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise InputError(None, f"'{key}': coordinates must be whole voxel indices, got {value!r}")
    return int(value)


def source_points(value, key: str) -> np.ndarray:
    """A list of ``[i, j, k]`` voxel indices (whole numbers) as an ``(n, 3)`` array, or InputError."""
    if value is None:
        return np.zeros((0, 3), np.int64)
    if not isinstance(value, list):
        raise InputError(None, f"'{key}' must be a list of [i, j, k] voxel indices, got {type(value).__name__}")
    out = []
    for p in value:
        if not isinstance(p, list) or len(p) != 3:
            raise InputError(None, f"'{key}': each point must be [i, j, k] (3 voxel indices), got {str(p)[:60]}")
        out.append([_whole(c, key) for c in p])
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def canonical_points(volume: Volume, value, key: str) -> np.ndarray:
    """Points of the image file's index space, checked to lie inside it, as canonical indices."""
    pts = source_points(value, key)
    shape = np.asarray(volume.source_shape)
    bad = np.nonzero(((pts < 0) | (pts >= shape)).any(axis=1))[0]
    if bad.size:
        raise InputError(None, f"'{key}': point {pts[bad[0]].tolist()} is outside the image (voxel indices "
                               f"0..{(shape - 1).tolist()} in the image file's order)")
    return volume.index_to_canonical(pts)


def canonical_box(volume: Volume, roi) -> tuple[slice, slice, slice] | None:
    """Slicer's ``roi`` ``[i0, i1, j0, j1, k0, k1]`` (file indices, corners in any order) as canonical
    slices clipped to the image; None for no ROI (absent or empty)."""
    if roi is None or roi == []:
        return None
    if not isinstance(roi, list) or len(roi) != 6:
        raise InputError(None, f"'roi' must be [i0, i1, j0, j1, k0, k1] or [], got {str(roi)[:80]}")
    lo = np.array([_whole(roi[0], "roi"), _whole(roi[2], "roi"), _whole(roi[4], "roi")])
    hi = np.array([_whole(roi[1], "roi"), _whole(roi[3], "roi"), _whole(roi[5], "roi")])
    shape = np.asarray(volume.source_shape)
    a, b = np.minimum(lo, hi).clip(0, shape - 1), np.maximum(lo, hi).clip(0, shape - 1)
    if (np.maximum(lo, hi) < 0).any() or (np.minimum(lo, hi) >= shape).any():
        raise InputError(None, f"'roi' {roi} does not overlap the image (voxel indices 0..{(shape - 1).tolist()})")
    c = volume.index_to_canonical(np.stack([a, b]))
    return tuple(slice(int(min(c[:, d])), int(max(c[:, d])) + 1) for d in range(3))  # type: ignore[return-value]


DEEPGROW_NEEDS_A_NAME = ("this model (type deepgrow) needs the organ's name in 'label', as 3D Slicer's Smart Edit "
                         "sends it; OHIF's Point Prompts send none: choose the point_prompts model there (it names "
                         "each organ's points)")


def deepgrow_edit(name: str | None, params: Mapping[str, Any], organs: Organs, volume: Volume) -> Edit:
    """Slicer's Smart Edit: ``name`` (the segment name it sends as ``label``), ``foreground`` / ``background``."""
    if not name:
        raise InputError(None, DEEPGROW_NEEDS_A_NAME)
    return Edit(organs.class_id(name), canonical_points(volume, params.get("foreground"), "foreground"),
                canonical_points(volume, params.get("background"), "background"))


NO_LABEL_KEYS = ("null", "undefined")  # OHIF keys clicks by the selected label; none selected -> "null"


def deepedit_edits(params: Mapping[str, Any], organs: Organs, volume: Volume) -> list[Edit]:
    """OHIF Point Prompts / Slicer deepedit: one key per organ name with its points, plus ``background``.
    A point of organ j is a negative click for every other organ; background points are negative for
    every organ. Organs without points keep their base label."""
    for k in NO_LABEL_KEYS:
        if params.get(k):
            raise InputError(None, "points were placed with no label selected: pick the organ in the Point "
                                   "Prompts list first, then place its points")
    bg = canonical_points(volume, params.get(BACKGROUND), BACKGROUND)
    own = {n: canonical_points(volume, params.get(n), n) for n in organs.names if params.get(n)}
    edits = []
    for name, fg in own.items():
        others = [p for n, p in own.items() if n != name]
        edits.append(Edit(organs.class_id(name), fg, np.concatenate([bg, *others]) if others else bg))
    if bg.size:  # background clicks alone still correct every organ they land in (decided by the caller)
        edits.append(Edit(0, np.zeros((0, 3), np.int64), bg))
    return edits


def vista_edit(params: Mapping[str, Any], organs: Organs, volume: Volume) -> tuple[list[int], Edit | None]:
    """OHIF's vista3d: ``label_prompt: [id]`` (answer ids, 1..N), ``points`` and ``point_labels`` (1 / 0).
    Returns (class ids asked for, the edit or None when no point is sent: OHIF's auto-segmentation tab
    asks for every label without points)."""
    prompt = params.get("label_prompt") or []
    if not isinstance(prompt, list):
        raise InputError(None, f"'label_prompt' must be a list of label ids, got {str(prompt)[:60]}")
    ids = []
    for v in prompt:
        pos = _whole(v, "label_prompt")
        if pos == len(organs.names) + 1:  # the model's 'background' entry: no organ to answer
            continue
        if not 1 <= pos <= len(organs.names):
            raise InputError(None, f"unknown label id {pos} in 'label_prompt'; this model's ids: "
                                   + ", ".join(f"{i + 1} = {n}" for i, n in enumerate(organs.names)))
        ids.append(organs.ids[pos - 1])
    pts = canonical_points(volume, params.get("points"), "points")
    labels = params.get("point_labels") or []
    if not isinstance(labels, list) or len(labels) != len(pts):
        raise InputError(None, f"'point_labels' must give one 1 (foreground) or 0 (background) per point: "
                               f"{len(pts)} points, {len(labels) if isinstance(labels, list) else 'no'} labels")
    if any(v not in (0, 1) or isinstance(v, bool) for v in labels):
        raise InputError(None, "'point_labels' must hold 1 (foreground) or 0 (background) only")
    if not len(pts):
        return ids, None
    if len(ids) != 1:
        raise InputError(None, "point prompts need exactly one organ in 'label_prompt' (pick an organ, not "
                               "'background', in the Point Prompts list)")
    lab = np.asarray(labels, dtype=int)
    return ids, Edit(ids[0], pts[lab == 1], pts[lab == 0])


def scribble_masks(params: Mapping[str, Any], label: np.ndarray, organs: Organs) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """Slicer's Scribbles: the whole segmentation (canonical array ``label``, values = ``label_info`` ids),
    ``label_info`` ``[{"name", "id"}]`` and ``selected_label_name``. Returns (class id, foreground
    scribble mask, background scribble mask, the uploaded organ segments as a class-id map, or None when
    the selected organ is not among them)."""
    name = params.get("selected_label_name")
    if not name:
        raise InputError(None, "scribbles need 'selected_label_name' (the organ the scribbles correct)")
    class_id = organs.class_id(name)
    info = params.get("label_info")
    if not isinstance(info, list):
        raise InputError(None, "scribbles need 'label_info' ([{\"name\": segment, \"id\": value}, ...]) to read "
                               "the uploaded segmentation")
    ids: dict[str, int] = {}
    for item in info:
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            value = item.get("id", item.get("idx"))
            if isinstance(value, int) and not isinstance(value, bool):
                ids[item["name"]] = value
    if FG_SCRIBBLES not in ids and BG_SCRIBBLES not in ids:
        raise InputError(None, f"the uploaded segmentation has no '{FG_SCRIBBLES}' or '{BG_SCRIBBLES}' segment "
                               f"in 'label_info'")
    fg = label == ids[FG_SCRIBBLES] if FG_SCRIBBLES in ids else np.zeros(label.shape, bool)
    bg = label == ids[BG_SCRIBBLES] if BG_SCRIBBLES in ids else np.zeros(label.shape, bool)
    if name not in ids:
        return class_id, fg, bg, None
    shown = np.zeros(label.shape, np.int16)
    for n, v in ids.items():
        if n in organs.names:
            shown[label == v] = organs.class_id(n)
    return class_id, fg, bg, shown
