"""The job side: NVFlare components and the client script for the MONAI spleen bundle.

This package ships inside each job's ``app/custom/`` (placed there by ``spleen-prepare-jobs``), so it depends only
on nvflare, monai, torch, ignite and TenSEAL: never on the host tooling ``spleen_tools``. What both sides share
(environment names, the key metric, log tags and the tagged-line format) lives in ``spleen_flare.contract``.
"""
