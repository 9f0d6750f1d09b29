"""Helpers behind the scripts of the federated spleen segmentation example."""
