"""Federated foundation models (FedSAM, FedMSA) for medical image segmentation in JAX."""

__version__ = "0.1.0"
