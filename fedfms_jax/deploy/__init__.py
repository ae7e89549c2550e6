"""Cross-silo deployment on Flower: each hospital runs a SuperNode with the ClientApp
(`client_app.app`), the coordinator a SuperLink that runs the ServerApp
(`server_app.app`). The app declaration for `flwr run` is deploy/flower/pyproject.toml.

Flower-free parts: `site` (a hospital's local training/evaluation), `server_state`
(aggregation, checkpoints, metrics), `dp` (clipping, noise, privacy accounting),
`payload` (trainable subtree <-> ArrayRecord), `tls` (test certificates and node keys).
"""
