"""NVFlare integration for the MONAI spleen bundle.

This package ships inside each job's ``app/custom/`` (placed there by ``spleen-prepare-jobs``), so it may only
depend on nvflare, monai, torch and ignite: never on ``spleen_fl``.
"""
