"""Strategy adapters: gather per-image scores from the datastore, rank with ssl_medsam2.strategies, and
lease the first image nobody else holds (leases make two annotators never get the same volume).

The request's ``client_id`` names the annotator: the app's route sets it to the token's user when auth
is on, else to what the client declared (``client_id`` / ``user``, or ``anonymous``), with
``ssl_anonymous`` true; anonymous clients together hold at most ``app.anonymous_leases`` leases.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from monailabel.interfaces.tasks.strategy import Strategy

from ssl_medsam2 import strategies
from ssl_medsam2.io import load_volume

from .workspace import Workspace

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "uncertainty": "Failed (quality gate) then most uncertain few-shot pseudo label first (run scoring "
                   "'uncertainty' or a few-shot infer)",
    "disagreement": "Largest few-shot vs nnU-Net disagreement first (scoring 'disagreement')",
    "diversity": "k-center on cheap image embeddings: the volume least like anything labelled",
    "random": "Random unlabelled volume",
    "first": "First unlabelled volume by name",
    "most_confident": "Pseudo-label review: most confident pseudo label first",
}


class LeasedStrategy(Strategy):
    def __init__(self, ws: Workspace, name: str):
        super().__init__(DESCRIPTIONS[name])
        self.ws = ws
        self.name = name

    def info(self):
        return {"description": self.description, "lease_hours": self.ws.leases.ttl_s / 3600}

    def _scores(self, ids, key):
        return {i: self.ws.image_info(i).get(key) for i in ids}

    def _embeddings(self, ids):
        grid = self.ws.app.embedding_grid
        cache = self.ws.state_dir / "embeddings"
        cache.mkdir(exist_ok=True)
        out = {}
        for i in ids:
            path = self.ws.datastore.get_image_uri(i)
            f = cache / f"{i}.npy"
            if f.exists() and f.stat().st_mtime >= os.stat(path).st_mtime:
                out[i] = np.load(f)
            else:
                out[i] = strategies.image_embedding(load_volume(path).array, grid)
                np.save(f, out[i])
        return out

    def rank(self, candidates: list[str], request) -> list[str]:
        if self.name == "uncertainty":
            failed = [i for i, f in self._scores(candidates, "ssl_fewshot_failed").items() if f]
            return strategies.rank_uncertainty(candidates, self._scores(candidates, "ssl_uncertainty"), failed)
        if self.name == "disagreement":
            return strategies.rank_disagreement(candidates, self._scores(candidates, "ssl_disagreement"))
        if self.name == "most_confident":
            return strategies.rank_most_confident(candidates, self._scores(candidates, "ssl_uncertainty"))
        if self.name == "diversity":
            labelled = sorted(self.ws.final_labelled())
            emb = self._embeddings(candidates + labelled)
            return strategies.k_center({i: emb[i] for i in candidates}, {i: emb[i] for i in labelled})
        if self.name == "random":
            return strategies.rank_random(candidates, request.get("seed"))
        return strategies.rank_first(candidates)

    def __call__(self, request, datastore):
        # only images the app can label and infer on (NIfTI): an NRRD put into the studies folder by hand
        # would break diversity for everyone and be handed out to be refused by every save
        candidates = self.ws.unlabelled()
        if not str(self.ws.studies).startswith(("http://", "https://")):  # (a PACS serves series, converted)
            candidates = [i for i in candidates if str(self.ws.datastore.get_image_uri(i)).endswith((".nii.gz", ".nii"))]
        if not candidates:
            return {}
        holder = str(request.get("client_id") or "anonymous")
        anonymous = request.get("ssl_anonymous", True) is not False
        ranked = self.rank(candidates, request)
        if request.get("ssl_no_lease"):  # a viewer (auth on, role user only): shown a free image, holds none
            held = self.ws.leases.held_by_others(holder)
            free = [i for i in ranked if i not in held]
            return {"id": free[0], "strategy": self.name, "lease": None} if free else {}
        lease = self.ws.leases.acquire_first(ranked, holder, strategy=self.name, anonymous=anonymous,
                                             anonymous_limit=self.ws.app.anonymous_leases)
        if lease is None:
            log.info("%s: every unlabelled image is leased to someone else", self.name)
            return {}
        info = self.ws.image_info(lease.image)
        score_key = {"uncertainty": "ssl_uncertainty", "most_confident": "ssl_uncertainty",
                     "disagreement": "ssl_disagreement"}.get(self.name)
        return {"id": lease.image, "strategy": self.name, "score": info.get(score_key) if score_key else None,
                "lease": {"holder": lease.holder, "since": lease.since, "expires": lease.expires}}
