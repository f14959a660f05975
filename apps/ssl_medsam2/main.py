"""SSL-MedSAM2 MONAI Label app: few-shot SAM2 / atlas pseudo labels, the FSL-nnUNet trainer, active
learning with leases, scoring and continuous retraining; a thin shell over the ``ssl_medsam2`` library.

Start:  python -m monailabel.main start_server --app apps/ssl_medsam2 --studies DIR --host 127.0.0.1 --port 8000
Any project config key can be overridden with ``--conf section.key value`` (e.g. ``--conf sam2.checkpoint
/path/MedSAM2_latest.pt``, ``--conf nnunet.epochs 2``, ``--conf app.lease_hours 2``).
Other apps (OHIF / auth) can reuse :func:`create_app` and :func:`lib.routes.install_routes`.
"""

from __future__ import annotations

import copy
import logging
import sys

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

import auth  # noqa: F401  Keycloak token check for PyJWT 2 + token-free /ohif/ (apps/ssl_medsam2/auth.py)
import dicomweb  # noqa: F401  DICOMweb mode: offline dcmqi, labelled state fresh after saves (dicomweb.py)
from lib.activelearning import LeasedStrategy
from lib.infers import FewShotInfer, NnUNetInfer
from lib.retrain import RetrainScheduler
from lib.scoring import DisagreementScoring, UncertaintyScoring
from lib.trainers import SSLNnUNetTrain
from lib.workspace import FINAL_TAG, Workspace

log = logging.getLogger(__name__)

TRAINER = "ssl_nnunet"


class SSLMedSAM2App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.workspace: Workspace | None = None
        self._pre_conf = dict(conf or {})
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="SSL-MedSAM2",
                         description="Semi-supervised 3D segmentation: few-shot SAM2 pseudo labels + nnU-Net rounds",
                         version="1.0")
        ws = self.workspace
        self._auto_update_scoring = bool(ws.cfg["app"].get("auto_update_scoring", False))
        self.retrain = RetrainScheduler(ws.state_dir / "retrain.json", ws.cfg["app"].get("retrain_after_labels", 0),
                                        ws.cfg["app"].get("retrain_debounce_s", 120),
                                        lambda: self.async_training(TRAINER, enqueue=True))

    # -- construction (light: no model is loaded here; child processes rebuild all of this) --
    def init_datastore(self):
        ds = super().init_datastore()
        self.workspace = Workspace(self.app_dir, self.studies, self._pre_conf, ds)
        return ds

    def init_infers(self):
        ws = self.workspace
        return {
            "sam2_fewshot": FewShotInfer(ws, "sam2", "TFFS-MedSAM2: training-free few-shot SAM2 propagation from "
                                                     "the labelled images (supports)"),
            "atlas_fewshot": FewShotInfer(ws, "atlas", "Few-shot atlas registration from the labelled images"),
            "nnunet": NnUNetInfer(ws),
        }

    def init_trainers(self):
        return {TRAINER: SSLNnUNetTrain(self.workspace)}

    def init_strategies(self):
        names = ("uncertainty", "disagreement", "diversity", "random", "first", "most_confident")
        return {n: LeasedStrategy(self.workspace, n) for n in names}

    def init_scoring_methods(self):
        return {"uncertainty": UncertaintyScoring(self.workspace),
                "disagreement": DisagreementScoring(self.workspace)}

    # -- behaviour --
    def model_availability(self, model: str) -> tuple[bool, str]:
        task = self._infers.get(model)
        if task is None:
            return False, f"unknown model '{model}'"
        return task.availability() if hasattr(task, "availability") else (task.is_valid(), "")

    def info(self):
        meta = super().info()
        meta["unavailable_models"] = {k: r for k in self._infers for ok, r in [self.model_availability(k)] if not ok}
        meta["ssl_medsam2"] = {"state_dir": str(self.workspace.state_dir),
                               "deployed_model": (self.workspace.registry.current() or {}).get("id"),
                               "pseudo_tag": self.workspace.pseudo_tag,
                               "lease_hours": self.workspace.leases.ttl_s / 3600,
                               "retrain": self.retrain.state() if hasattr(self, "retrain") else None}
        return meta

    def infer(self, request, datastore=None):
        request = copy.deepcopy(request)
        image = request.get("image")
        ds = datastore or self.datastore()
        if isinstance(image, str) and image in set(ds.list_images()):
            request["image_id"] = image
        return super().infer(request, datastore)

    def batch_defaults(self, model: str, params: dict) -> dict:
        """Batch infer that works on CPU: one device, no multi-GPU split; few-shot results go to the pseudo tag."""
        import torch

        if not torch.cuda.is_available():
            params.update(multi_gpu=False, device="cpu")
        if model.endswith("_fewshot"):
            params.setdefault("label_tag", self.workspace.pseudo_tag)
        return params

    def batch_infer(self, request, datastore=None):
        return super().batch_infer(self.batch_defaults(request.get("model", ""), dict(request)), datastore)

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"unknown strategy '{strategy}'")
        return super().next_sample(request)

    def on_label_saved(self, image_id: str, tag: str, user: str) -> dict:
        """After a validated save: release the image's lease; final labels count towards retraining."""
        self.workspace.leases.release(image_id)
        res = {"lease_released": True}
        if tag == FINAL_TAG:
            res.update(self.retrain.label_saved(image_id))
        log.info("label saved: %s (%s) by %s", image_id, tag, user)
        return res

    def on_init_complete(self):
        super().on_init_complete()
        server = sys.modules.get("monailabel.app")  # only in the server process, never in child processes
        if server is not None:
            from lib.routes import install_routes

            install_routes(server.app, self)


def create_app(app_dir: str, studies: str, conf: dict | None = None) -> SSLMedSAM2App:
    """Build the app outside ``start_server`` (tests, other apps reusing it)."""
    return SSLMedSAM2App(app_dir=app_dir, studies=studies, conf=conf or {})
