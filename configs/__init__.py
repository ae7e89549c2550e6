"""Training configs (ml_collections): `--config configs/<name>.py[:key=value,...]`."""
