"""The paper's order with the stock SAM2 predictor calls: the oracle the fast engines are tested against.

One run = one support inserted at one position, one class: build the pseudo-video from pixels,
``add_new_mask`` on every prompted support slice, ``propagate_in_video`` forward from the first
prompted frame; ``reset_state``, the same prompts again, ``propagate_in_video`` backward from the last
one; average the two directions where both reach a frame; keep the query frames. No caches, no
batching — it exists so that :mod:`.sam2_engine` and :mod:`.sam2_batch` can be shown to give the same
probabilities (tests, ``bench/tffs_speed.py``). Runs on CPU and CUDA.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..preprocess import frames_for_model
from ..protocol import PseudoVideo, combine_directions
from .sam2_context import QueryContext, SupportContext


@contextlib.contextmanager
def quiet_sam2_progress():
    """SAM2's propagate_in_video draws a tqdm bar per call; the reference path makes hundreds."""
    import sam2.sam2_video_predictor as svp

    orig = svp.tqdm
    svp.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        svp.tqdm = orig


def run_reference(predictor, autocast, q: QueryContext, s: SupportContext,
                  position: int, mask: np.ndarray) -> np.ndarray:
    """Query-slice probabilities (n_query, H, W) of one run, float32 on the host."""
    h, w = q.hw
    video = PseudoVideo(q.n_slices, s.n_slices, position)
    frames = frames_for_model(video.assemble(q.scaled, s.scaled), int(predictor.image_size))
    prompted = SupportContext.prompted_slices(mask)
    state = predictor.init_state_from_frames(frames, h, w)
    results = {}
    with torch.inference_mode(), autocast(), quiet_sam2_progress():
        for reverse in (False, True):
            predictor.reset_state(state)
            for j in prompted:
                predictor.add_new_mask(state, video.support_frame(j), 1, torch.from_numpy(mask[j]))
            start = video.support_frame(prompted[-1] if reverse else prompted[0])
            probs = torch.zeros((video.length, h, w), dtype=torch.float32)
            valid = np.zeros(video.length, dtype=bool)
            for f, _, masks in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                probs[f] = torch.sigmoid(masks[0, 0].float()).cpu()  # masks live on the model's device
                valid[f] = True
            results[reverse] = (probs.numpy(), valid)
    prob, valid = combine_directions(results[False][0], results[True][0], results[False][1], results[True][1])
    qf = video.query_frames()
    if not valid[qf].all():
        raise RuntimeError("some query frames were reached by neither direction")
    return prob[qf]
