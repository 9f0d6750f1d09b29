"""Run a MONAI bundle's trainer and evaluator round by round for federated learning.

Only config ids that the model-zoo ``spleen_ct_segmentation`` bundle also has are used, so the official bundle
drops in unchanged: ``bundle_root``, ``dataset_dir``, ``network_def``, ``network``, ``device``, ``ckpt_dir``,
``train#dataset#data``, ``train#trainer``, ``validate#dataset#data``, ``validate#evaluator``, ``initialize``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from spleen_flare.contract import KEY_METRIC
from spleen_flare.site_install import confined_path

if TYPE_CHECKING:
    from spleen_flare.dp import DPSettings, SitePrivacy

logger = logging.getLogger(__name__)

BEST_LOCAL_MODEL = "best_local_model.pt"


def resolve_config_files(bundle_root: Path, config_files: Sequence[str]) -> list[str]:
    """Config files relative to the bundle root, inside the bundles folder (the bundle and its overrides: a job
    names no other file, configs run as code); a missing one is an error naming it."""
    resolved = []
    for name in config_files:
        path = confined_path(Path(bundle_root).parent, str(Path(Path(bundle_root).name) / name))
        if not path.is_file():
            raise FileNotFoundError(f"bundle config {path} not found: run `spleen-prepare-jobs` to place the bundle")
        resolved.append(str(path))
    return resolved


def build_network(bundle_root: str | Path, config_files: Sequence[str] = ("configs/train.json",), seed: int = 0):
    """The bundle's ``network_def``, initialised under a fixed seed (same weights on every call)."""
    parser = ConfigParser()
    parser.read_config(resolve_config_files(Path(bundle_root), config_files))
    parser["bundle_root"] = str(bundle_root)
    torch.manual_seed(seed)
    return parser.get_parsed_content("network_def", instantiate=True)


def to_tensor_dict(weights: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in weights.items()}


class BundleRunner:
    """Holds one parsed bundle: its network, trainer and evaluator, kept across FL rounds."""

    def __init__(
        self,
        bundle_root: str | Path,
        config_files: Sequence[str] = ("configs/train.json",),
        dataset_dir: str | None = None,
        training: list[dict] | None = None,
        validation: list[dict] | None = None,
        dp: DPSettings | None = None,
    ) -> None:
        """``dp``: train with DP-SGD (``spleen_flare.dp``): one patch per case, the configs checked first."""
        self.bundle_root = Path(bundle_root).resolve()
        parser = ConfigParser()
        parser.read_config(resolve_config_files(self.bundle_root, config_files))
        parser["bundle_root"] = str(self.bundle_root)
        if dataset_dir:
            parser["dataset_dir"] = str(dataset_dir)
        if training is not None:
            parser["train#dataset#data"] = training
        if validation is not None:
            parser["validate#dataset#data"] = validation
        self.parser = parser
        self.dp_changes: list[str] = []
        if dp:  # Opacus only where a site trains with DP
            from spleen_flare.dp import DPError, SitePrivacy, dp_config_problems, one_patch_per_case

            self.dp_changes = one_patch_per_case(parser)
            problems = dp_config_problems(parser)
            if problems:
                raise DPError(f"DP: {problems[0]}")
        if "initialize" in parser:
            parser.get_parsed_content("initialize")
        self.device = parser.get_parsed_content("device")
        self.network: torch.nn.Module = parser.get_parsed_content("network")
        self.trainer = parser.get_parsed_content("train#trainer")
        self.evaluator = parser.get_parsed_content("validate#evaluator")
        self.privacy: SitePrivacy | None = SitePrivacy(self.trainer, self.network, dp) if dp else None
        self.ckpt_dir = Path(parser.get_parsed_content("ckpt_dir"))
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        (self.ckpt_dir / BEST_LOCAL_MODEL).unlink(missing_ok=True)
        # "local": the evaluator scores this site's own training (the bundle's ValidationHandler);
        # "external": it scores a model received from the server (global or another site's).
        self.phase = "local"
        self.best_local_metric = -1.0
        self.last_local_metric = float("nan")
        self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._track_best_local)
        self.anchor: torch.nn.Module | None = None  # FedProx, SCAFFOLD: the global model a round started from
        self.scaffold = None  # SCAFFOLD: NVFlare's PTScaffoldHelper (the site's control variate c_i)
        self._controls: tuple[dict, dict] | None = None  # SCAFFOLD: this round's (c, c_i)

    @property
    def num_train_cases(self) -> int:
        return len(self.parser["train#dataset#data"])

    @property
    def global_epoch(self) -> int:
        return int(self.trainer.state.epoch)

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}

    def set_weights(self, weights: Mapping[str, Any], keep: frozenset[str] = frozenset()) -> None:
        """Load ``weights``; the keys in ``keep`` stay this network's own (FedBN: the site's BatchNorm layers)."""
        new = to_tensor_dict(weights)
        if keep:
            own = self.network.state_dict()
            new = {k: own[k] if k in keep else new[k] for k in own}
        self.network.load_state_dict(new, strict=True)

    def norm_keys(self) -> frozenset[str]:
        """The state-dict keys of the network's BatchNorm layers (weights, biases, running statistics)."""
        keys = set()
        for name, module in self.network.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                keys |= {f"{name}.{key}" for key in module.state_dict()}
        return frozenset(keys)

    def use_fedprox(self, mu: float) -> None:
        """FedProx (Li et al. 2020): the bundle's loss plus mu/2 x the squared distance of the weights from the global
        model the round started from (``anchor``, set by :meth:`anchor_to_current`), NVFlare's ``PTFedProxLoss``."""
        from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

        proximal, bundle_loss = PTFedProxLoss(mu=mu), self.trainer.loss_function
        self._keep_anchor()

        def loss_with_proximal_term(pred, label, **kwargs):
            return bundle_loss(pred, label, **kwargs) + proximal(self.network, self.anchor)

        self.trainer.loss_function = loss_with_proximal_term

    def use_scaffold(self) -> None:
        """SCAFFOLD (Karimireddy et al. 2020) with NVFlare's ``PTScaffoldHelper``: after every optimizer step of the
        bundle's trainer the weights move by -lr x (c - c_i); see :meth:`scaffold_start` and :meth:`scaffold_end`."""
        from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

        self.scaffold = PTScaffoldHelper()
        self.scaffold.init(self.network)
        self._keep_anchor()
        self.trainer.add_event_handler(Events.ITERATION_COMPLETED, self._scaffold_correction)

    def scaffold_start(self, global_controls: Mapping[str, Any]) -> None:
        """This round's global control variate c (shapes checked against the network's parameters)."""
        if not global_controls:
            raise ValueError(
                "SCAFFOLD: the global model came without control variates; the server's job must use SCAFFOLD too"
            )
        self.scaffold.load_global_controls(to_tensor_dict(global_controls))
        self._controls = self.scaffold.get_params()

    def _scaffold_correction(self, engine) -> None:
        if self._controls is not None:
            self.scaffold.model_update(self.network, self._learning_rate(), *self._controls)

    def scaffold_end(self) -> dict[str, np.ndarray]:
        """After the round's training: c_i updated from how far the weights moved; returns delta c_i."""
        if self._controls is None:
            raise RuntimeError("SCAFFOLD: scaffold_start was not called this round")
        self.scaffold.terms_update(self.network, self._learning_rate(), *self._controls, self.anchor)
        self._controls = None
        return self.scaffold.get_delta_controls()

    def _learning_rate(self) -> float:
        return float(self.trainer.optimizer.param_groups[0]["lr"])

    def _keep_anchor(self) -> None:
        """A frozen copy of the network for the round's global model (FedProx's and SCAFFOLD's reference), once."""
        if self.anchor is None:
            self.anchor = copy.deepcopy(self.network).requires_grad_(False)

    def anchor_to_current(self) -> None:
        """The proximal term's reference: the weights as they are now (the global model just received)."""
        if self.anchor is not None:
            self.anchor.load_state_dict(self.network.state_dict())

    def catch_up(self, epoch: int) -> None:
        """Count epochs (and iterations) from ``epoch`` on, if behind: a job that resumes at round r trains from
        global epoch r x local epochs, as the lost job did, so the sites' metric steps go on where they were."""
        if self.global_epoch < epoch:
            self.trainer.state.iteration = epoch * len(self.trainer.data_loader)
            self.trainer.state.epoch = epoch

    def train(self, epochs: int) -> int:
        """Continue training for ``epochs`` more epochs; returns the number of iterations run."""
        self.phase = "local"
        start_iteration = int(self.trainer.state.iteration)
        self.trainer.state.max_epochs = self.global_epoch + epochs
        self.trainer.run()
        return int(self.trainer.state.iteration) - start_iteration

    def evaluate(
        self, weights: Mapping[str, Any] | None = None, external: bool = False, keep: frozenset[str] = frozenset()
    ) -> dict[str, float]:
        """Score ``weights`` (or the current weights) on this site's validation data.

        With ``weights`` the local network is restored afterwards, so evaluating a foreign model never changes
        what this site trains; ``keep``: weights of this network's own it is scored with (FedBN). ``external`` marks
        the current weights as not locally trained (e.g. the global model just received), so they are neither logged
        as local validation nor kept as the best local model.
        """
        backup = None
        if weights is not None:
            backup = self.get_weights()
            self.set_weights(weights, keep=keep)
        if weights is not None or external:
            self.phase = "external"
        try:
            self.evaluator.run(max(self.global_epoch, 1))
        finally:
            if backup is not None:
                self.set_weights(backup)
            self.phase = "local"
        return {k: float(v) for k, v in self.evaluator.state.metrics.items() if np.isscalar(v) or _is_scalar(v)}

    def _track_best_local(self, engine) -> None:
        if self.phase != "local":
            return
        metric = engine.state.metrics.get(KEY_METRIC)
        if metric is not None:
            self.last_local_metric = float(metric)
        if metric is not None and float(metric) > self.best_local_metric:
            self.best_local_metric = float(metric)
            torch.save({"model": self.get_weights()}, self.ckpt_dir / BEST_LOCAL_MODEL)

    def best_local_weights(self) -> dict[str, torch.Tensor]:
        """Best locally trained weights by validation Dice; validates the current weights if none was kept."""
        path = self.ckpt_dir / BEST_LOCAL_MODEL
        if not path.is_file():
            self.evaluate()
        if not path.is_file():
            # Validation produced no key metric: fall back to the current weights.
            return copy.deepcopy(self.get_weights())
        return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _is_scalar(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1
