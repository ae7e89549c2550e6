"""Training and benchmark configs (ml_collections), installed as `fedfms_jax.configs`.

Name one by file (`--config configs/prostate.py[:key=value,...]`) or by name
(`--config prostate[:key=value,...]`).
"""
