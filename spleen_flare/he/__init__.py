"""Homomorphic-encryption (TenSEAL CKKS) pieces for the spleen_ct_segmentation_he job."""
