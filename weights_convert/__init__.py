"""PyTorch SAM-family checkpoints to Flax parameters and back."""
