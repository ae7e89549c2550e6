"""nuclei federation with the original FedFMS settings.

--config configs/nuclei.py[:method=fedmsa|fedsam,mode=federated|centralized|local,unseen=I,tiny=true]
"""
from configs.common import federation_config


def get_config(arg=None):
    return federation_config("nuclei", arg)
