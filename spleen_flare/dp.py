"""Sample-level differential privacy at a site: DP-SGD with Opacus inside the bundle's own trainer.

A *sample* is one training case (a patient's scan): every case gives one patch per draw (``num_samples`` 1), the
loss is per case (``batch`` false), and the network has no BatchNorm (``bundles/overrides/dp.json``: instance norm),
so Opacus's per-sample gradients are per case. Each step draws every case independently with probability
q = batch size / cases (Poisson sampling, what the accountant assumes), clips each case's gradient to
``max_grad_norm`` and adds Gaussian noise of ``noise_multiplier`` x ``max_grad_norm``. A draw with no case is a step
too (noise only): the number of steps per epoch is fixed (1/q), never data-dependent. Opacus's RDP accountant counts
every step of the job at this site; (epsilon, delta) after each round is what the site's updates and every model it
sends reveal about any one of its training cases, whoever reads them (server, other sites, HE or not).

Noise and sampling draw from a generator seeded from ``os.urandom``: the bundle seeds torch's global generator
(``set_determinism``), and noise anyone can replay protects nothing. Opacus's ``secure_mode`` (a CSPRNG) needs
``torchcsprng``, whose last release (2021) requires torch 1.8; the generators are torch's own (Mersenne Twister
on the CPU, Philox on CUDA), not CSPRNGs.

The site's own limits come from its environment (never from the job): ``SPLEEN_DP_MAX_EPSILON`` makes DP required and
caps epsilon, ``SPLEEN_DP_MAX_DELTA`` caps delta (default 1e-5 when a cap is set).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from ignite.engine import Engine
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from spleen_flare.contract import DP_MAX_DELTA_ENV, DP_MAX_EPSILON_ENV, DP_OVERRIDE_FILE

DEFAULT_DELTA = 1e-5
DEFAULT_MAX_GRAD_NORM = 1.0
# transforms that give several patches per case: one per draw under DP (else a case is several samples)
MULTI_PATCH_KEY = "num_samples"
EMPTY_DRAW = "dp_empty_draw"


class DPError(ValueError):
    """DP settings a site cannot train with (one line: what, and the fix)."""


class DPBudgetSpent(RuntimeError):
    """The next round would take this site past its epsilon budget: it stops."""


@dataclass(frozen=True)
class DPSettings:
    """The job's DP options as the site runs them (after :func:`with_site_limits`)."""

    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    delta: float = DEFAULT_DELTA
    noise_multiplier: float | None = None  # sigma; or
    target_epsilon: float | None = None  # the whole job's epsilon: sigma chosen so that the last round ends there
    max_epsilon: float | None = None  # stop before a round would pass it (default: target_epsilon)

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise DPError("DP needs exactly one of a noise multiplier or a target epsilon (--dp-noise or --dp-epsilon)")
        for name in ("max_grad_norm", "noise_multiplier", "target_epsilon", "max_epsilon"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise DPError(f"DP {name} must be positive, got {value}")
        if not 0 < self.delta < 1:
            raise DPError(f"DP delta must be in (0, 1), got {self.delta}")

    @property
    def budget(self) -> float | None:
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon


def with_site_limits(settings: DPSettings | None, site: str, env: Mapping[str, str] | None = None) -> DPSettings | None:
    """The job's settings under the site's own caps (its environment): the smaller budget and delta win; a site with
    a cap refuses a job without DP."""
    env = os.environ if env is None else env
    cap, max_delta = env.get(DP_MAX_EPSILON_ENV), env.get(DP_MAX_DELTA_ENV)
    if not cap and not max_delta:
        return settings
    try:
        cap_value = float(cap) if cap else None
        delta_value = float(max_delta) if max_delta else DEFAULT_DELTA
    except ValueError:
        limits = f"{DP_MAX_EPSILON_ENV}={cap!r}, {DP_MAX_DELTA_ENV}={max_delta!r}"
        raise DPError(f"{site}: the site's DP limits ({limits}) must be numbers") from None
    if settings is None:
        raise DPError(
            f"{site} trains only with differential privacy ({DP_MAX_EPSILON_ENV}={cap}): submit the job with --dp"
        )
    budget = settings.budget
    if cap_value is not None:
        budget = cap_value if budget is None else min(budget, cap_value)
    return replace(settings, delta=min(settings.delta, delta_value), max_epsilon=budget)


def dp_config_problems(parser) -> list[str]:
    """What in the parsed bundle config breaks per-case DP (with the fix), before anything is built; the network's
    layers are checked once it is (Opacus's validator)."""
    if parser.get("loss#batch", False):
        return [f"the loss mixes the cases of a batch (loss#batch true): add {DP_OVERRIDE_FILE}"]
    return []


def one_patch_per_case(parser) -> list[str]:
    """Set every multi-patch crop of the training transforms to one patch per case; returns what changed."""
    changed = []
    for i, transform in enumerate(parser.get("train#random_transforms", []) or []):
        if isinstance(transform, dict) and int(transform.get(MULTI_PATCH_KEY, 1)) != 1:
            changed.append(f"{transform.get('_target_')} {MULTI_PATCH_KEY} {transform[MULTI_PATCH_KEY]} -> 1")
            parser[f"train#random_transforms#{i}#{MULTI_PATCH_KEY}"] = 1
    return changed


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator nobody can replay: seeded from the OS, not from the bundle's fixed seed."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


class CaseSampledLoader(DataLoader):
    """The trainer's dataset, drawn by Poisson sampling of cases: 1/q draws an epoch, a draw may be empty."""

    def __init__(self, loader: DataLoader, sample_rate: float, generator: torch.Generator) -> None:
        dataset = loader.dataset
        self.sample_rate = sample_rate
        sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate, generator=generator)
        collate = loader.collate_fn

        def collate_or_empty(items: list):
            return {EMPTY_DRAW: True} if not items else collate(items)

        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate_or_empty, num_workers=loader.num_workers)


class SiteDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer that can take a step in which no case counts (an empty draw): noise only."""

    mask_next_step = False

    def _no_case(self) -> None:
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def clip_and_accumulate(self) -> None:
        if self.mask_next_step:  # a step computed on a stand-in case that must not count
            self._no_case()
            self.mask_next_step = False
        super().clip_and_accumulate()

    def noise_only_step(self) -> None:
        self.zero_grad()
        self._no_case()
        self.step()


class SitePrivacy:
    """DP-SGD in one bundle trainer, and the accountant of every step this site takes in the job."""

    def __init__(self, trainer: Engine, network: torch.nn.Module, settings: DPSettings) -> None:
        problems = [str(e).splitlines()[0] for e in ModuleValidator.validate(network, strict=False)]
        if problems:
            raise DPError(f"the network cannot train with DP ({problems[0]}): add {DP_OVERRIDE_FILE} to the configs")
        self.settings = settings
        loader = trainer.data_loader
        self.cases = len(loader.dataset)
        batch = int(loader.batch_size or 1)
        if self.cases < 1:
            raise DPError("DP: the site has no training case")
        self.sample_rate = min(1.0, batch / self.cases)
        device = next(network.parameters()).device
        self.accountant = RDPAccountant()
        self.grad_sample_module = GradSampleModule(network, loss_reduction="mean")  # hooks on the layers
        self.optimizer = SiteDPOptimizer(
            trainer.optimizer,
            noise_multiplier=settings.noise_multiplier or 0.0,  # set by plan() for a target epsilon
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=batch,
            loss_reduction="mean",
            generator=secure_generator(device),  # the noise is drawn where the weights are
        )
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        trainer.optimizer = self.optimizer
        trainer.data_loader = CaseSampledLoader(loader, self.sample_rate, secure_generator())
        self.steps_per_epoch = len(trainer.data_loader)
        self.empty_draws = 0  # steps in which no case was drawn (noise only)
        trainer.state.epoch_length = self.steps_per_epoch
        self._wrap_iteration(trainer)

    def _wrap_iteration(self, trainer: Engine) -> None:
        """An empty draw takes a noise-only step, and the handlers see the last real batch's output again (ignite
        clears the engine's own between iterations). Before any real batch, the first case stands in, with its
        contribution masked: the step is still noise only."""
        iteration = trainer._process_function
        first_case = trainer.data_loader.collate_fn([trainer.data_loader.dataset[0]])
        last = {}

        def dp_iteration(engine: Engine, batch):
            if not (isinstance(batch, dict) and batch.get(EMPTY_DRAW)):
                last["output"] = iteration(engine, batch)
                return last["output"]
            self.empty_draws += 1
            if "output" not in last:
                self.optimizer.mask_next_step = True
                return iteration(engine, first_case)
            self.optimizer.noise_only_step()
            return last["output"]

        trainer._process_function = dp_iteration

    @property
    def noise_multiplier(self) -> float:
        return float(self.optimizer.noise_multiplier)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.accountant.history)

    def epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon at the settings' delta over the steps taken so far, plus ``extra_steps`` more."""
        accountant = self.accountant
        if extra_steps:
            accountant = copy.deepcopy(accountant)
            accountant.history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        if not accountant.history:
            return 0.0
        return float(accountant.get_epsilon(delta=self.settings.delta))

    def plan(self, total_steps: int) -> None:
        """With a target epsilon, the noise multiplier that ends the job's ``total_steps`` there."""
        if self.settings.target_epsilon is not None:
            self.optimizer.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.settings.target_epsilon,
                target_delta=self.settings.delta,
                sample_rate=self.sample_rate,
                steps=total_steps,
                accountant="rdp",
            )

    def check_budget(self, steps: int, site: str, rnd: int | None) -> float:
        """Epsilon after ``steps`` more (round ``rnd``, counted from 0); raises :class:`DPBudgetSpent` when that
        passes the budget."""
        after = self.epsilon(steps)
        budget = self.settings.budget
        if budget is not None and after > budget:
            raise DPBudgetSpent(
                f"{site} stops before round {rnd + 1}: epsilon would reach {after:.3g} > its budget {budget:g} "
                f"(delta {self.settings.delta:g}; spent {self.epsilon():.3g} in {self.steps} steps)"
            )
        return after

    def report(self) -> dict[str, float]:
        """What a round's line, metrics and summary carry."""
        return {
            "dp_epsilon": self.epsilon(),
            "dp_delta": self.settings.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_max_grad_norm": self.settings.max_grad_norm,
            "dp_steps": self.steps,
            "dp_sample_rate": self.sample_rate,
        }
