"""TenSEAL contexts for the HE tests, made by NVFlare's own ``HEBuilder`` with the provisioning parameters (CKKS,
8192, [60, 40, 40], 2^40, symmetric encryption): sites get the secret key, the server only the relinearization keys.
``foreign`` is a second provisioning: same parameters, another key pair (what a re-provisioned site holds)."""

from __future__ import annotations

import pytest
import tenseal as ts
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.lighter.impl.he import HEBuilder

from spleen_flare.he.aggregator import PackedHEAggregator
from spleen_flare.he.keys import key_fingerprint


def provisioned() -> tuple[ts.Context, ts.Context]:
    """(site context, server context) of one provisioning, as the kits carry them."""
    builder = HEBuilder()  # defaults = the provisioning's: CKKS, 8192, [60, 40, 40], scale 2^40
    builder.initialize(None, None)
    client = ts.context_from(builder.get_serialized_context(is_client=True))
    server = ts.context_from(builder.get_serialized_context(is_client=False))
    assert client.is_private() and not server.is_private()
    return client, server


@pytest.fixture(scope="session")
def contexts() -> tuple[ts.Context, ts.Context]:
    return provisioned()


@pytest.fixture(scope="session")
def key(contexts) -> str:
    """The provisioning's key fingerprint (what its site kits' he_key_fingerprint.txt holds)."""
    return key_fingerprint(contexts[1])


@pytest.fixture(scope="session")
def foreign() -> tuple[ts.Context, ts.Context, str]:
    """Another provisioning with the same CKKS parameters: (site context, server context, key fingerprint)."""
    client, server = provisioned()
    return client, server, key_fingerprint(server)


def server_aggregator(server_ctx: ts.Context) -> tuple[PackedHEAggregator, FLContext]:
    """A fresh server aggregator at round 0 over ``server_ctx``, with its FL context."""
    agg = PackedHEAggregator()
    agg.tenseal_context = server_ctx  # what START_RUN loads from the server's kit
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    agg.reset(fl_ctx)
    return agg, fl_ctx
