"""TenSEAL contexts for the HE tests, made by NVFlare's own ``HEBuilder`` with the provisioning parameters (CKKS,
8192, [60, 40, 40], 2^40, symmetric encryption): sites get the secret key, the server only the relinearization keys.
``foreign`` is a second provisioning: same parameters, another key pair (what a re-provisioned site holds)."""

from __future__ import annotations

import pytest
import tenseal as ts
from nvflare.lighter.impl.he import HEBuilder

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
