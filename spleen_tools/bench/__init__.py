"""Benchmarks on synthetic data: the validity study (centralized vs local-only vs FedAvg, IID and non-IID)."""
