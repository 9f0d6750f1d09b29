"""The job side: NVFlare components and the client script for the MONAI spleen bundle.

The server and every site install this package (``pip install -e .`` of this repository at the version a job names
in its ``meta.json``); a job carries no code, only JSON that names these classes, which each participant's
``class_allow_list`` lets through (see ``site_install`` and docs/secure_and_he.md). It depends only on nvflare,
monai, torch, ignite and TenSEAL: never on the host tooling ``spleen_tools``. What both sides share (environment
names, the key metric, log tags and the tagged-line format) lives in ``spleen_flare.contract``.
"""

__version__ = "0.2.0"
