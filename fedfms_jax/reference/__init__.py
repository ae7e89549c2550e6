"""PyTorch references written the way the original FedFMS code computes (need the `bench` or `test` extra)."""
