"""nuclei federation with the original FedFMS settings, starting from SAM ViT-B (weights/sam_vit_b).

--config nuclei[:method=fedmsa|fedsam,mode=federated|centralized|local,unseen=I,tiny=true]
"""
from fedfms_jax.run_config import federation_config


def get_config(arg=None):
    return federation_config("nuclei", arg)
