"""Bytes and seconds of one HE FedAvg round on the full-size spleen UNet: stock NVFlare vs ours vs plaintext.

Two sites send fixed updates (no training) through the real components, with contexts made by NVFlare's
HEBuilder with the provisioning parameters (CKKS, 8192, [60, 40, 40], 2^40, symmetric; the server gets no
secret key). Messages go through FOBS, NVFlare's wire format, so sizes are what travels.
- plain: FedAvg as in the local job (InTimeAccumulateWeightedAggregator, FullModelShareableGenerator);
- stock: NVFlare 2.9's HEModelEncryptor (weights by local steps, diffs), HEInTimeAccumulateWeightedAggregator,
  HEModelShareableGenerator, HEModelDecryptor: one CKKS vector per tensor, a context copy in each;
- ours: spleen_flare.he (PackedHEEncryptor, PackedHEAggregator, PackedHEShareableGenerator, PackedHEDecryptor):
  all floats weighted and packed 8192 to a ciphertext (4096 complex slots) at the lowest level, each sent as
  its first polynomial and the seed of the second; the server adds first polynomials and keeps the seeds.
Columns (seconds on this machine): encrypt = one site's result filter; up = serialize + deserialize one update;
aggregate = the server's accept of both updates + aggregate + generator; down = serialize + deserialize the
global model; decrypt = one site's task-data filter; round = encrypt + 2 x up + aggregate + down + decrypt
(the sites run in parallel, the server receives both updates). Prints figures, asserts nothing.
Usage: .venv/bin/python benchmarks/he_update_size.py [--layouts plain,ours,stock] [--train-s 60]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import numpy_decomposers
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
from nvflare.app_opt.he import decomposers as he_decomposers
from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator
from nvflare.fuel.utils import fobs
from nvflare.lighter.impl.he import HEBuilder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_flare.bundle_runner import build_network  # noqa: E402
from spleen_flare.he.aggregator import PackedHEAggregator, PackedHEShareableGenerator  # noqa: E402
from spleen_flare.he.filters import PackedHEDecryptor, PackedHEEncryptor  # noqa: E402
from spleen_flare.he.packing import key_fingerprint  # noqa: E402
from spleen_tools.paths import BUNDLE_SRC  # noqa: E402

SITES = {"site-1": 16, "site-2": 24}  # local steps = aggregation weights


def contexts() -> tuple[ts.Context, ts.Context]:
    builder = HEBuilder()  # the provisioning's parameters
    builder.initialize(None, None)
    return (
        ts.context_from(builder.get_serialized_context(is_client=True)),
        ts.context_from(builder.get_serialized_context(is_client=False)),
    )


def timed(fn: Callable, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def site_ctx(site: str, task: str = "train") -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    fl_ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    fl_ctx.set_peer_context(FLContext())  # the server's context, which NVFlare's encryptor asks for
    return fl_ctx


def wire(sh: Shareable) -> tuple[Shareable, int, float]:
    """What the receiver gets: FOBS bytes and back; returns (shareable, bytes, seconds)."""
    start = time.perf_counter()
    blob = fobs.dumps(sh)
    back = fobs.loads(blob)
    return back, len(blob), time.perf_counter() - start


def run_round(layout: str, state: dict, client_ctx: ts.Context, server_ctx: ts.Context) -> dict:
    """One FedAvg round through ``layout``'s components; returns sizes, seconds and the max error."""
    global_model = {k: v.copy() for k, v in state.items()}
    rng = np.random.default_rng(0)
    local = {
        s: {
            k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in state.items()
        }
        for s in SITES
    }
    total = sum(SITES.values())
    expected = {k: sum(local[s][k].astype(np.float64) * n for s, n in SITES.items()) / total for k in state}
    server_fl_ctx = FLContext()
    server_fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    server_fl_ctx.set_prop(
        AppConstants.GLOBAL_MODEL, make_model_learnable(global_model, {}), private=True, sticky=False
    )

    if layout == "plain":
        agg, gen = (
            InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHTS),
            FullModelShareableGenerator(),
        )
        agg._initialize(agg.aggregation_weights, agg.exclude_vars, agg.expected_data_kind)
        enc = dec = None
        kind = DataKind.WEIGHTS
    elif layout == "stock":
        agg = HEInTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHT_DIFF)
        agg._initialize(agg.aggregation_weights, agg.exclude_vars, agg.expected_data_kind)
        gen = HEModelShareableGenerator()
        gen.tenseal_context = server_ctx
        enc, dec = HEModelEncryptor(weigh_by_local_iter=True), HEModelDecryptor()
        enc.tenseal_context, enc.encrypt_layers = client_ctx, [True]  # what START_RUN sets
        dec.tenseal_context = client_ctx
        kind = DataKind.WEIGHT_DIFF  # the stock job sends diffs
    else:
        agg, gen = PackedHEAggregator(), PackedHEShareableGenerator()
        agg.tenseal_context = server_ctx
        agg.reset(server_fl_ctx)
        enc, dec = PackedHEEncryptor(weigh_by_local_iter=True), PackedHEDecryptor()
        enc.tenseal_context = dec.tenseal_context = client_ctx
        enc.key_fingerprint = dec.key_fingerprint = key_fingerprint(server_ctx)  # what START_RUN reads from the kit
        kind = DataKind.WEIGHTS

    out = {"encrypt_s": 0.0, "up_s": 0.0, "aggregate_s": 0.0}
    for site, steps in SITES.items():
        params = local[site] if kind == DataKind.WEIGHTS else {k: local[site][k] - state[k] for k in state}
        sh = DXO(kind, {k: v.copy() for k, v in params.items()}, {MetaKey.NUM_STEPS_CURRENT_ROUND: steps})
        sh = sh.to_shareable()
        sh.set_header(AppConstants.CURRENT_ROUND, 0)
        if enc is not None:
            sh, seconds = timed(enc.process, sh, site_ctx(site))
            out["encrypt_s"] = max(out["encrypt_s"], seconds)
        sh, n_bytes, seconds = wire(sh)
        out["update_bytes"], out["up_s"] = n_bytes, out["up_s"] + seconds
        sh.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        sh.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
        accepted, seconds = timed(agg.accept, sh, server_fl_ctx)
        assert accepted, (layout, site)
        out["aggregate_s"] += seconds
    start = time.perf_counter()
    result = agg.aggregate(server_fl_ctx)
    model = gen.shareable_to_learnable(result, server_fl_ctx)
    task = gen.learnable_to_shareable(model, server_fl_ctx)
    out["aggregate_s"] += time.perf_counter() - start
    task.set_header(AppConstants.CURRENT_ROUND, 1)
    task, out["model_bytes"], out["down_s"] = wire(task)
    out["decrypt_s"] = 0.0
    if dec is not None:
        task, out["decrypt_s"] = timed(dec.process, task, site_ctx("site-1"))
    got = from_shareable(task).data
    out["max_err"] = max(
        float(np.max(np.abs(np.asarray(got[k], dtype=np.float64).reshape(state[k].shape) - expected[k])))
        for k in state
        if state[k].dtype.kind == "f"
    )
    out["round_s"] = out["encrypt_s"] + out["up_s"] + out["aggregate_s"] + out["down_s"] + out["decrypt_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="plain,ours,stock", help="comma-separated: plain, ours, stock")
    parser.add_argument(
        "--train-s",
        type=float,
        default=None,
        help="seconds of local training + validation per round (e.g. a plain run's round time): also print the "
        "projected HE round time vs plain",
    )
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/he_update_size.json")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # components outside a running system log about the missing engine
    numpy_decomposers.register()
    he_decomposers.register()
    state = {k: v.numpy() for k, v in build_network(BUNDLE_SRC).state_dict().items()}
    plain_bytes = sum(v.nbytes for v in state.values())
    n_float = sum(v.size for v in state.values() if v.dtype.kind == "f")
    client_ctx, server_ctx = contexts()
    print(
        f"network: {len(state)} tensors, {n_float} float values, {plain_bytes / 1e6:.1f} MB as sent in plaintext; "
        f"2 sites; server context {len(server_ctx.serialize()) / 1e6:.2f} MB"
    )
    rows = {}
    for layout in [x.strip() for x in args.layouts.split(",") if x.strip()]:
        with contextlib.redirect_stdout(io.StringIO()):  # the filters' [spleen-he] lines
            rows[layout] = r = run_round(layout, state, client_ctx, server_ctx)
        print(
            f"{layout:>5}: update {r['update_bytes'] / 1e6:7.1f} MB ({r['update_bytes'] / plain_bytes:5.2f}x)  "
            f"global model {r['model_bytes'] / 1e6:7.1f} MB  encrypt {r['encrypt_s']:5.1f} s  up {r['up_s']:5.1f} s  "
            f"aggregate {r['aggregate_s']:5.1f} s  down {r['down_s']:5.1f} s  decrypt {r['decrypt_s']:5.1f} s  "
            f"round work {r['round_s']:5.1f} s  max error {r['max_err']:.1e}",
            flush=True,
        )
    if "plain" in rows:
        base = rows["plain"]["round_s"]
        for layout, r in rows.items():
            if layout == "plain":
                continue
            line = f"{layout}: HE adds {r['round_s'] - base:.1f} s per round"
            if args.train_s:
                ratio = (args.train_s + r["round_s"]) / (args.train_s + base)
                line += f"; with {args.train_s:.0f} s of training per round: {ratio:.2f}x the plain round time"
            print(line)
    if args.save:
        kept = {layout: {k: v for k, v in r.items() if isinstance(v, int | float)} for layout, r in rows.items()}
        print(f"saved {record.save('he_update_size', {'plain_bytes': plain_bytes, 'layouts': kept})}")


if __name__ == "__main__":
    main()
