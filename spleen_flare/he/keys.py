"""Computing and checking a key fingerprint without NVFlare: refuse a packed model encrypted under another key pair.

Why a fingerprint, and how it reaches the site kits: ``spleen_flare.he.fingerprint`` (provisioning, NVFlare). It
is computed and checked here, without NVFlare, so that the packed format (``packing``) can check keys without
importing NVFlare's provisioning and security modules.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import tenseal as ts

from spleen_flare.he.seal_format import _saved, seal_body

FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT_DOMAIN = b"spleen-flare/he-key-fingerprint/v1\x00"  # not any other sha256 of these bytes
_FIX_KEY = "give every participant kits from the same provisioning"


def key_fingerprint(public_ctx: ts.Context) -> str:
    """sha256 (hex) of the relinearization keys a public context stores: names the provisioning's key pair.

    Only a stored key gives the same bytes at every load, and only the server's public context
    (``server_context.tenseal``) stores them: a site's context regenerates them, randomly, when it is loaded.
    """
    if public_ctx.is_private():
        raise ValueError(
            "key_fingerprint needs the server's public context (server_context.tenseal): a context with the "
            "secret key regenerates its relinearization keys at every load"
        )
    try:
        relin_keys = public_ctx.relin_keys().data
    except ValueError:
        raise ValueError("this TenSEAL context holds no relinearization keys: use server_context.tenseal") from None
    _, body = seal_body(_saved(relin_keys))  # uncompressed: the compressed bytes need not be canonical
    return hashlib.sha256(_FINGERPRINT_DOMAIN + body).hexdigest()


def _short(fingerprint: Any) -> str:
    return f"{fingerprint[:12]}.." if isinstance(fingerprint, str) else "none"


def check_key(theirs: Any, ours: str, what: str, whose: str) -> None:
    """Refuse ``what`` unless it was encrypted under the key ``ours`` names (``whose``: "the server's", ...)."""
    if theirs != ours:
        raise ValueError(
            f"{what} is encrypted under another HE key (fingerprint {_short(theirs)} vs {whose} {_short(ours)}): "
            f"{_FIX_KEY}"
        )


def checked_fingerprint(value: Any, source: str) -> str:
    """``value`` if it is a key fingerprint (64 lowercase hex digits); ``source`` names where it came from."""
    if not (isinstance(value, str) and FINGERPRINT_RE.fullmatch(value)):
        raise ValueError(f"{source} is not an HE key fingerprint (64 hex digits): {_FIX_KEY}")
    return value
