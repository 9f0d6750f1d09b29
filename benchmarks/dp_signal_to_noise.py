"""Why DP-SGD learns nothing at a site of a few cases: one step's signal against its noise, measured.

One real DP-SGD step of the bundle's network (DP variant: instance norm) on a synthetic case: Opacus's per-case
gradient, clipped to ``--clip``; then the step's gradient with the Gaussian noise of each noise multiplier of the
utility study added (``DPOptimizer.add_noise``, as in training), divided by the expected batch (1 case, cpu_quick).
Prints the norms of the clipped gradient and of the noise, their cosine, and how many steps the noise needs to
average down to the signal's size (the square of the noise-to-signal ratio) against the steps a site takes in the
study (10 rounds x 5 epochs x 6 draws). ``--save`` records ``benchmarks/results/dp_signal_to_noise.json``.

Usage: ``.venv/bin/python benchmarks/dp_signal_to_noise.py [--sigmas 11.875,4.463,2.029,0.890] [--save]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_flare.bundle_runner import BundleRunner  # noqa: E402
from spleen_flare.contract import DP_OVERRIDE_FILE  # noqa: E402
from spleen_flare.dp import EMPTY_DRAW, DPSettings  # noqa: E402
from spleen_flare.site_data import load_site_datalist  # noqa: E402
from spleen_tools.bench.arms import CONFIG_FILES  # noqa: E402
from spleen_tools.data import make_site_datalists, make_synthetic_dataset  # noqa: E402
from spleen_tools.paths import BUNDLE_SRC  # noqa: E402

STUDY_STEPS = 10 * 5 * 6  # the utility study: rounds x local epochs x draws per epoch (6 cases, q = 1/6)


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def measure(sigmas: list[float], clip: float, work: Path) -> dict:
    data = make_synthetic_dataset(work / "data", num_train=3, num_test=1, shape=(96, 96, 24), seed=0)
    training, validation = load_site_datalist(make_site_datalists(data, num_sites=1)["site-1"])
    shutil.copytree(BUNDLE_SRC, work / "b" / BUNDLE_SRC.name)
    shutil.copytree(BUNDLE_SRC.parent / "overrides", work / "b" / "overrides")
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=clip)
    runner = BundleRunner(work / "b" / BUNDLE_SRC.name, [*CONFIG_FILES, DP_OVERRIDE_FILE], str(data), training,
                          validation, dp=settings)  # fmt: skip
    trainer, optimizer = runner.trainer, runner.privacy.optimizer
    batch = next(b for b in trainer.data_loader if not (isinstance(b, dict) and b.get(EMPTY_DRAW)))
    image, label = batch["image"].to(runner.device), batch["label"].to(runner.device)
    optimizer.zero_grad()
    trainer.loss_function(runner.network(image), label).backward()
    optimizer.clip_and_accumulate()
    params = optimizer.params
    clipped = [p.summed_grad.detach().clone() for p in params]
    optimizer.noise_multiplier = 0.0
    optimizer.add_noise()
    optimizer.scale_grad()
    signal = flat_grad(params).clone()
    rows = []
    for sigma in sigmas:
        optimizer.noise_multiplier = sigma
        for p, summed in zip(params, clipped, strict=True):  # the same clipped sum each time
            p.summed_grad = summed.clone()
        optimizer.add_noise()
        optimizer.scale_grad()
        noisy = flat_grad(params)
        noise = (noisy - signal).norm().item()
        ratio = noise / signal.norm().item()
        cosine = torch.nn.functional.cosine_similarity(noisy, signal, dim=0).item()
        rows.append({"sigma": sigma, "noise_norm": round(noise, 2), "noise_to_signal": round(ratio, 1),
                     "cosine": round(cosine, 5), "steps_to_average_out": round(ratio**2)})  # fmt: skip
    return {
        "parameters": int(signal.numel()),
        "cases_in_batch": int(image.shape[0]),
        "clip": clip,
        "clipped_gradient_norm": round(signal.norm().item(), 4),
        "study_steps_per_site": STUDY_STEPS,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigmas", default="11.875,4.4629,2.0288,0.8902", help="the utility study's noise")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = measure([float(s) for s in args.sigmas.split(",")], args.clip, Path(work))
    print(f"{result['parameters']} weights; one case's clipped gradient: norm {result['clipped_gradient_norm']}")
    print("sigma   noise norm   noise/signal   cosine(noisy, clean)   steps to average the noise down to the signal")
    for row in result["rows"]:
        print(f"{row['sigma']:6.3f}  {row['noise_norm']:10.1f}  {row['noise_to_signal']:12.1f}  {row['cosine']:20.5f}  "
              f"{row['steps_to_average_out']:>12}  (a site takes {STUDY_STEPS} in the study)")  # fmt: skip
    if args.save:
        print(f"saved {record.save('dp_signal_to_noise', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
