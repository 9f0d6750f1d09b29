"""Size and time of one encrypted client update for the spleen UNet (TenSEAL CKKS, provisioning parameters).

Prints figures, asserts nothing. Layouts measured:
- stock: what NVFlare 2.9 sends, one CKKS vector per tensor, each serialized with its own public context;
- stock ciphertext only: the same vectors without the context copies;
- packed: all weights in one flat array, one CKKS vector per 4096 slots, one public context per message.
Usage: .venv/bin/python benchmarks/he_update_size.py [--scale 0.1]  (scale < 1 takes a prefix of the tensors).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tenseal as ts
from monai.networks.nets import UNet


def make_context() -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    ctx.global_scale = 2**40  # no Galois keys: sums need none, and NVFlare's provisioned context has none
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the network's parameters to encrypt")
    args = parser.parse_args()
    net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
    state = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    budget = int(sum(v.size for v in state.values()) * args.scale)
    params, n = {}, 0
    for k, v in state.items():
        if n >= budget:
            break
        params[k], n = v, n + v.size
    plain_bytes = sum(v.nbytes for v in params.values())
    ctx = make_context()
    public = ctx.copy()
    public.make_context_public()
    ctx_bytes = len(public.serialize())

    t0 = time.perf_counter()
    vecs = [ts.ckks_vector(ctx, v.ravel().astype(np.float64)) for v in params.values()]
    t_stock = time.perf_counter() - t0
    ct_bytes = sum(len(v.serialize()) for v in vecs)
    stock_bytes = ct_bytes + ctx_bytes * len(vecs)

    flat = np.concatenate([v.ravel() for v in params.values()]).astype(np.float64)
    slots = 8192 // 2
    t0 = time.perf_counter()
    packed = [ts.ckks_vector(ctx, flat[i : i + slots]) for i in range(0, flat.size, slots)]
    t_packed = time.perf_counter() - t0
    packed_bytes = sum(len(v.serialize()) for v in packed) + ctx_bytes

    print(f"tensors={len(params)} parameters={flat.size} plain_bytes={plain_bytes} public_context_bytes={ctx_bytes}")
    print(f"stock: bytes={stock_bytes} ratio={stock_bytes / plain_bytes:.1f}x encrypt_s={t_stock:.1f}")
    print(f"stock ciphertext only: bytes={ct_bytes} ratio={ct_bytes / plain_bytes:.1f}x")
    print(
        f"packed (one context): ciphertexts={len(packed)} bytes={packed_bytes} "
        f"ratio={packed_bytes / plain_bytes:.1f}x encrypt_s={t_packed:.1f}"
    )


if __name__ == "__main__":
    main()
