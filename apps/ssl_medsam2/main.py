"""SSL-MedSAM2 MONAI Label app: few-shot SAM2 / atlas pseudo labels, the FSL-nnUNet trainer, active
learning with leases, scoring and continuous retraining; a thin shell over the ``ssl_medsam2`` library.

Start:  python -m monailabel.main start_server --app apps/ssl_medsam2 --studies DIR --host 127.0.0.1 --port 8000
Any project config key can be overridden with ``--conf section.key value`` (e.g. ``--conf sam2.checkpoint
/path/MedSAM2_latest.pt``, ``--conf nnunet.epochs 2``, ``--conf app.lease_hours 2``).
Other apps can reuse :func:`create_app` and :func:`lib.routes.install_routes`.
"""

from __future__ import annotations

import copy
import logging
import sys
import time

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from ssl_medsam2.cluster import cluster_address

import monailabel_085  # every MONAI Label 0.8.5 workaround (token check, DICOMweb, datastore file, routes)
from lib.activelearning import LeasedStrategy
from lib.infers import FewShotInfer, NnUNetInfer
from lib.interactive import interactive_tasks
from lib.retrain import RetrainScheduler
from lib.scoring import DisagreementScoring, UncertaintyScoring
from lib.trainers import SSLNnUNetTrain
from lib.workspace import FINAL_TAG, Workspace

log = logging.getLogger(__name__)
IMPORTED_AT = time.time()  # before this server wrote anything: older scratch / temp files are a stopped server's
monailabel_085.install()

TRAINER = "ssl_nnunet"


class SSLMedSAM2App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.workspace: Workspace | None = None
        self.pseudo_ahead = None  # the server's pseudo-label store + queue (lib/pseudo_ahead.py), set at start
        self.datastore_recovery: str | None = None
        self._pre_conf = dict(conf or {})
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="SSL-MedSAM2",
                         description="Semi-supervised 3D segmentation: few-shot SAM2 pseudo labels + nnU-Net rounds",
                         version="1.0")
        ws = self.workspace
        # a model that cannot work (a --conf sam2.checkpoint file that is not there) is said at start, not at
        # the first request: in the log and in /info
        self.startup_warnings = [f"{k} unavailable: {r}" for k, t in self.infer_tasks.items()
                                 if isinstance(t, FewShotInfer) for ok, r in [t.availability()] if not ok]
        for w in self.startup_warnings:
            log.warning("%s", w)
        monailabel_085.set_auto_update_scoring(self, ws.app.auto_update_scoring)
        self.retrain = RetrainScheduler(ws.state_dir / "retrain.json", ws.app.retrain_after_labels,
                                        ws.app.retrain_debounce_s,
                                        lambda: self.async_training(TRAINER, enqueue=True))

    # -- construction (light: no model is loaded here; child processes rebuild all of this) --
    def init_datastore(self):
        from monailabel.config import settings

        if self.studies.startswith(("http://", "https://")):
            ds = super().init_datastore()
        else:  # MONAI Label's local datastore, its file written atomically and recovered when damaged
            self.datastore_recovery = monailabel_085.recover_datastore_file(self.studies)
            ds = monailabel_085.local_datastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)
        self.workspace = Workspace(self.app_dir, self.studies, self._pre_conf, ds)
        return ds

    def init_infers(self):
        ws = self.workspace
        self.infer_tasks = {
            "sam2_fewshot": FewShotInfer(ws, "sam2", "TFFS-MedSAM2: training-free few-shot SAM2 propagation from "
                                                     "the labelled images (supports)"),
            "atlas_fewshot": FewShotInfer(ws, "atlas", "Few-shot atlas registration from the labelled images"),
            "nnunet": NnUNetInfer(ws),
            **interactive_tasks(ws),  # smart_edit, point_prompts, point_prompts_vista, scribbles
        }
        return self.infer_tasks

    def _organ_looks(self):
        """The interactive models' shared organ looks (lib/appearance.py)."""
        return self.infer_tasks["smart_edit"].looks

    def init_trainers(self):
        self.train_tasks = {TRAINER: SSLNnUNetTrain(self.workspace)}
        return self.train_tasks

    def init_strategies(self):
        names = ("uncertainty", "disagreement", "diversity", "random", "first", "most_confident")
        self.strategy_tasks = {n: LeasedStrategy(self.workspace, n) for n in names}
        return self.strategy_tasks

    def init_scoring_methods(self):
        self.scoring_tasks = {"uncertainty": UncertaintyScoring(self.workspace),
                              "disagreement": DisagreementScoring(self.workspace)}
        return self.scoring_tasks

    # -- behaviour --
    def model_availability(self, model: str) -> tuple[bool, str]:
        task = self.infer_tasks.get(model)
        if task is None:
            return False, f"unknown model '{model}'"
        return task.availability() if hasattr(task, "availability") else (task.is_valid(), "")

    def info(self):
        meta = super().info()
        meta["unavailable_models"] = {k: r for k in self.infer_tasks for ok, r in [self.model_availability(k)] if not ok}
        meta["ssl_medsam2"] = {"state_dir": str(self.workspace.state_dir),
                               "deployed_model": (self.workspace.registry.current() or {}).get("id"),
                               "pseudo_tag": self.workspace.pseudo_tag,
                               "failed_pseudo_labels": self.workspace.failed_pseudo_labels(),
                               "lease_hours": self.workspace.leases.ttl_s / 3600,
                               "datastore_recovery": self.datastore_recovery,
                               "startup_warnings": getattr(self, "startup_warnings", []),
                               "retrain": self.retrain.state() if hasattr(self, "retrain") else None,
                               "pseudo_labels": self.pseudo_ahead.status() if self.pseudo_ahead else None}
        return meta

    def infer(self, request, datastore=None):
        request = copy.deepcopy(request)
        image = request.get("image")
        ds = datastore or self.datastore()
        if isinstance(image, str) and image in set(ds.list_images()):
            request["image_id"] = image
        if self.pseudo_ahead is None:
            return super().infer(request, datastore)
        with self.pseudo_ahead.interactive():  # background pseudo labels wait while a client's request runs
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
        model = request.get("model", "")
        params = self.batch_defaults(model, dict(request))
        task = self.infer_tasks.get(model)
        if isinstance(task, FewShotInfer) and cluster_address(self.workspace.cfg):
            from lib.cluster_batch import batch_fewshot_on_cluster  # cluster.ray_address: hand it to Ray

            return batch_fewshot_on_cluster(self.workspace, task.engine_name, params, datastore or self.datastore())
        return super().batch_infer(params, datastore)

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self.strategy_tasks:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"unknown strategy '{strategy}'")
        return super().next_sample(request)

    def on_label_saved(self, image_id: str, tag: str, user: str) -> dict:
        """After a validated save: a final label ends the image's lease (whoever held it: the image is
        labelled now), any other save only the saver's own lease; final labels count towards retraining."""
        released = self.workspace.leases.release(image_id, holder=None if tag == FINAL_TAG else user)
        res = {"lease_released": released}
        if tag == FINAL_TAG:
            res.update(self.retrain.label_saved(image_id))
            if self.pseudo_ahead is not None:  # new supports: every stored pseudo label is recomputed
                self.pseudo_ahead.queue.refresh(f"final label saved for {image_id}")
            if sys.modules.get("monailabel.app") is not None:  # and the organ looks are learned again
                self._organ_looks().changed()
        log.info("label saved: %s (%s) by %s", image_id, tag, user)
        return res

    def on_init_complete(self):
        super().on_init_complete()
        server = sys.modules.get("monailabel.app")  # only in the server process, never in child processes
        if server is not None:
            from lib.guards import clean_stale
            from lib.routes import install_routes

            studies = None if self.studies.startswith(("http://", "https://")) else self.studies
            removed = clean_stale(self.workspace.scratch_root, studies, IMPORTED_AT)
            if any(removed.values()):
                log.warning("removed what a stopped server left behind: %d scratch folders, %d datastore temp "
                            "files", removed["scratch"], removed["datastore_temp"])
            install_routes(server.app, self)
            from lib.pseudo_ahead import PseudoAhead, PseudoStoreSettings

            if PseudoStoreSettings.from_config(self.workspace.cfg).enabled:
                self.pseudo_ahead = self.workspace.pseudo_ahead = PseudoAhead(self).start()
            self._organ_looks().changed()  # the server learns the organ looks now, not at the first click


def create_app(app_dir: str, studies: str, conf: dict | None = None) -> SSLMedSAM2App:
    """Build the app outside ``start_server`` (tests, other apps reusing it)."""
    return SSLMedSAM2App(app_dir=app_dir, studies=studies, conf=conf or {})
