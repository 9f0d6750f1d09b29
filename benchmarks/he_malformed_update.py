"""What one malformed HE update costs its reader: the server's aggregator, and a site's decryptor.

Builds the malformed updates a security review found (a consistent layout declaring 4,000,000 and 1,000,000
ciphertexts, 400,000 empty blobs, a shape of 1,000,000 entries, a weight of 1.7e308) around a real update of a
small model (2 ciphertexts, contexts made by NVFlare's HEBuilder with the provisioning parameters), hands each to
the real components as the first update of a round, and prints per case: the outcome (refused, accepted, or the
exception that escaped), the seconds it took (median of ``--repeat`` runs, tracemalloc off), the peak of traced
memory (tracemalloc, one more run: numpy reports its buffers to it) and the length of the refusal (the error the
aggregator logs; the exception a site's decryptor raises). An intact update is the reference. ``--save`` records
them, with the server's figures before the fix (``BEFORE``), in benchmarks/results/he_malformed_update.json.
Asserts nothing.
Usage: .venv/bin/python benchmarks/he_malformed_update.py [--repeat 5] [--save]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.lighter.impl.he import HEBuilder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import record  # noqa: E402

from spleen_flare.he.aggregator import PackedHEAggregator  # noqa: E402
from spleen_flare.he.filters import PackedHEDecryptor  # noqa: E402
from spleen_flare.he.packing import HE_META_KEY, ct_key, encrypt_model, key_fingerprint  # noqa: E402

MODEL = {
    "conv.weight": np.random.default_rng(0).normal(0, 0.2, (32, 16, 3, 3, 3)).astype(np.float32),  # 2 ciphertexts
    "bn.num_batches_tracked": np.asarray(7, dtype=np.int64),
}
NBT = "bn.num_batches_tracked"

# The server's aggregator on each case before the fix, as ``measure`` reports it (None: not measured, or no
# refusal to measure). Not re-run: the old code is gone; kept here so the JSON and BENCHMARKS.md carry them.
BEFORE = {
    "provenance": "measured on commit 47c6cf1, 2-core CPU, once",
    "server": {
        "layout of 4,000,000 ciphertexts": {
            "outcome": "refused",
            "seconds": 26.6,
            "peak_mib": 525,
            "message_chars": 66_900_000,
        },
        "layout of 1,000,000 ciphertexts": {
            "outcome": "refused",
            "seconds": 7.7,
            "peak_mib": 130,
            "message_chars": 15_900_000,
        },
        "400,000 empty blobs": {
            "outcome": "escaped: MemoryError",
            "note": "numpy asked for 24.4 GiB",
            "seconds": None,
            "peak_mib": None,
            "message_chars": None,
        },
        "shape of 1,000,000 entries": {"outcome": "accepted", "seconds": 2.3, "peak_mib": None, "message_chars": None},
        "weight 1.7e308": {"outcome": "accepted", "seconds": None, "peak_mib": None, "message_chars": None},
    },
}


def _contexts() -> tuple[ts.Context, ts.Context]:
    builder = HEBuilder()  # the provisioning's parameters: CKKS, 8192, [60, 40, 40], scale 2^40
    builder.initialize(None, None)
    client = ts.context_from(builder.get_serialized_context(is_client=True))
    return client, ts.context_from(builder.get_serialized_context(is_client=False))


def _declaring(meta: dict, chunks: int) -> dict:
    """A consistent layout of ``chunks`` ciphertexts: one float tensor filling them all."""
    meta = copy.deepcopy(meta)
    n_values = chunks * 2 * meta["slots"]
    meta.update(n_values=n_values, chunks=chunks, tensors=[["w", [n_values], "float32", 0]])
    return meta


def malformed_updates(data: dict, meta: dict) -> dict[str, tuple[dict, dict]]:
    """{case: (data, he_meta)}: the review's attacks, each around the intact ``(data, meta)``."""
    long_shape = copy.deepcopy(meta)
    name, shape, dtype, offset = long_shape["tensors"][0]
    long_shape["tensors"][0] = [name, [1] * (1_000_000 - len(shape)) + shape, dtype, offset]  # the same values
    huge_weight = copy.deepcopy(meta)
    huge_weight["weight"] = 1.7e308  # two such summed to inf
    empty = {ct_key(k): b"" for k in range(400_000)} | {NBT: data[NBT]}
    return {
        "intact update (reference)": (data, meta),
        "layout of 4,000,000 ciphertexts": (data, _declaring(meta, 4_000_000)),
        "layout of 1,000,000 ciphertexts": (data, _declaring(meta, 1_000_000)),
        "400,000 empty blobs": (empty, _declaring(meta, 400_000)),
        "shape of 1,000,000 entries": (data, long_shape),
        "weight 1.7e308": (data, huge_weight),
    }


class _Messages(logging.Handler):
    """The lengths of the error lines about site-2 (on the root logger: nothing is printed). NVFlare adds a line of
    its own here ("no engine in fl_ctx", as it fires the log event outside a running system): not counted."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lengths: list[int] = []

    def emit(self, rec: logging.LogRecord) -> None:
        if "site-2" in rec.getMessage():
            self.lengths.append(len(rec.getMessage()))


MESSAGES = _Messages()


def _server_call(server_ctx: ts.Context, key: str, data: dict, meta: dict) -> Callable[[], tuple]:
    """A call that hands the update to a fresh aggregator (the round's first; made outside the measured part)."""

    def call() -> tuple[str, int, float, int]:
        agg = PackedHEAggregator()
        agg.tenseal_context, agg.key_fingerprint = server_ctx, key  # what START_RUN loads and computes
        fl_ctx = FLContext()
        fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
        agg.reset(fl_ctx)
        sh: Shareable = DXO(DataKind.WEIGHTS, data, {HE_META_KEY: meta}).to_shareable()
        sh.set_peer_props({ReservedKey.IDENTITY_NAME: "site-2"})
        sh.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
        MESSAGES.lengths.clear()
        (accepted, seconds, peak) = _measured(lambda: agg.accept(sh, fl_ctx))
        outcome = accepted if isinstance(accepted, str) else "accepted" if accepted else "refused"
        return outcome, max(MESSAGES.lengths, default=0), seconds, peak

    return call


def _site_call(client_ctx: ts.Context, key: str, data: dict, meta: dict) -> Callable[[], tuple]:
    """A call that hands the update, as the global model, to a site's decryptor."""

    def call() -> tuple[str, int, float, int]:
        dec = PackedHEDecryptor()
        dec.tenseal_context, dec.key_fingerprint = client_ctx, key
        fl_ctx = FLContext()
        fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
        fl_ctx.set_prop(FLContextKey.TASK_NAME, "train", private=True, sticky=False)
        task = DXO(DataKind.WEIGHTS, data, {HE_META_KEY: meta}).to_shareable()
        result, seconds, peak = _measured(lambda: dec.process(task, fl_ctx))
        if isinstance(result, str):
            return result, 0, seconds, peak
        if isinstance(result, ValueError):
            return "refused", len(str(result)), seconds, peak
        return "decrypted", 0, seconds, peak

    return call


TRACE = False  # whether _measured traces memory (a run of its own: tracing slows Python's allocations)


def _measured(call: Callable[[], Any]) -> tuple[Any, float, int]:
    """(what ``call`` returned, its ValueError, or "escaped: <type>"; seconds; peak traced bytes when TRACE)."""
    if TRACE:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        result = call()
    except ValueError as err:
        result = err
    except BaseException as err:  # what escaped is the figure (the code before the fix)
        result = f"escaped: {type(err).__name__}"
    seconds = time.perf_counter() - start
    peak = 0
    if TRACE:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, seconds, peak


def measure(call: Callable[[], tuple], repeat: int) -> dict[str, Any]:
    """Outcome, median seconds (tracemalloc off), peak traced MiB (one more run) and refusal length."""
    global TRACE
    runs = [call() for _ in range(repeat)]
    TRACE = True
    try:
        peak = call()[3]
    finally:
        TRACE = False
    outcome, length = runs[-1][:2]
    return {
        "outcome": outcome,
        "seconds": round(statistics.median(r[2] for r in runs), 5),
        "peak_mib": round(peak / 2**20, 3),
        "message_chars": length,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (the median is printed)")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/he_malformed_update.json")
    args = parser.parse_args()
    logging.getLogger().addHandler(MESSAGES)  # the refusals' lines are measured, not printed
    client_ctx, server_ctx = _contexts()
    key = key_fingerprint(server_ctx)
    data, meta = encrypt_model(MODEL, client_ctx, 3.0, key=key)
    results = {}
    print(f"{'case':34} {'reader':7} {'outcome':22} {'seconds':>9} {'peak MiB':>9} {'message chars':>14}")
    for case, (case_data, case_meta) in malformed_updates(data, meta).items():
        for reader, call in (
            ("server", _server_call(server_ctx, key, case_data, case_meta)),
            ("site", _site_call(client_ctx, key, case_data, case_meta)),
        ):
            row = measure(call, args.repeat)
            results.setdefault(case, {})[reader] = row
            print(
                f"{case:34} {reader:7} {row['outcome']:22} {row['seconds']:9.5f} {row['peak_mib']:9.3f} "
                f"{row['message_chars']:14d}"
            )
    print(f"server before the fix ({BEFORE['provenance']}):")
    for case, row in BEFORE["server"].items():
        print(f"  {case:32} " + ", ".join(f"{k} {v}" for k, v in row.items() if v is not None))
    if args.save:
        saved = record.save("he_malformed_update", {"repeat": args.repeat, "cases": results, "before": BEFORE})
        print(f"saved {saved}")


if __name__ == "__main__":
    main()
