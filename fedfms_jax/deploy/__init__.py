"""Cross-silo deployment on Flower: each hospital runs a SuperNode with the ClientApp
(`client_app.app`) and beside it its long-lived `site_worker`, the coordinator a SuperLink
that runs the ServerApp (`server_app.app`). The app declaration for `flwr run` is
deploy/flower/pyproject.toml; README "Run a real federation" walks through a deployment.

Flower-free parts: `site` (a hospital's local training/evaluation on its own data),
`site_worker` (keeps a hospital's SiteTrainer across messages), `server_state`
(aggregation, checkpoints, metrics), `start_weights` (the starting weights' hash),
`dp` (clipping, noise, privacy accounting), `payload` (trainable subtree <-> ArrayRecord),
`tls` (test certificates and node keys).
"""
