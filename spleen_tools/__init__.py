"""The host side: tooling that prepares data and jobs and starts, follows and stops the federated system.

Runs on the machine that drives the system (never inside a job). It may import the job side's small contract,
``spleen_flare.contract``; the job side never imports anything from here.
"""
