"""The sam2 package's video predictor, subclassed as little as possible for in-memory videos.

Two additions, both behaviour-preserving:

* :meth:`InMemoryVideoPredictor.init_state_from_frames` builds the same ``inference_state`` as
  ``init_state`` but from an (N, 3, S, S) normalised tensor instead of a JPEG folder.
* ``_get_image_feature`` serves precomputed per-frame features when the state carries a
  ``feature_source`` (a callable frame index -> prepared features); otherwise it is the stock method.

Everything else (``add_new_mask``, ``propagate_in_video``, ``track_step``) is SAM2's own code.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from sam2.sam2_video_predictor import SAM2VideoPredictor


class InMemoryVideoPredictor(SAM2VideoPredictor):
    @torch.inference_mode()
    def init_state_from_frames(self, frames: torch.Tensor, video_height: int, video_width: int,
                               feature_source=None) -> dict:
        """An inference state over in-memory frames (or only a feature source: ``frames`` may be None)."""
        device = self.device
        state = {
            "images": frames,
            "num_frames": len(frames) if frames is not None else feature_source.num_frames,
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            "video_height": int(video_height),
            "video_width": int(video_width),
            "device": device,
            "storage_device": device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
            "feature_source": feature_source,
        }
        if feature_source is None:
            self._get_image_feature(state, frame_idx=0, batch_size=1)  # warm-up, as init_state does
        return state

    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        source = inference_state.get("feature_source")
        if source is None:
            return super()._get_image_feature(inference_state, frame_idx, batch_size)
        vision_feats, vision_pos, feat_sizes = source(frame_idx)
        if batch_size != 1:
            vision_feats = [x.expand(-1, batch_size, -1) for x in vision_feats]
            vision_pos = [x.expand(-1, batch_size, -1) for x in vision_pos]
        return None, None, vision_feats, vision_pos, feat_sizes

    @torch.inference_mode()
    def encode_frames(self, frames: torch.Tensor, batch: int):
        """Backbone features of every frame, batched: list of per-frame flattened feature levels,
        plus the (frame-independent) positional encodings and feature sizes."""
        per_frame = []
        pos = sizes = None
        for i in range(0, len(frames), batch):
            chunk = frames[i:i + batch].to(self.device, non_blocking=True).float()
            out = self.forward_image(chunk)
            _, feats, pos_b, sizes_b = self._prepare_backbone_features(out)
            if pos is None:
                pos = [p[:, :1].clone() for p in pos_b]
                sizes = sizes_b
            for j in range(chunk.shape[0]):
                per_frame.append([f[:, j:j + 1].clone() for f in feats])
        return per_frame, pos, sizes
