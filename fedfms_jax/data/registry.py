"""The federations this library knows: names, sites, classes, batch sizes and builders.

The one place these facts live. Configs take their classes and the original's batch
sizes from here, `federations.get_federation` their loader, and each TFDS builder its
sites and classes.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FederationInfo:
    name: str
    # Sites in the original's client order; empty when the data decides them (isic: the
    # three largest source collections; synthetic: site0 ... site{n-1}).
    sites: tuple[str, ...]
    num_classes: int
    batch_fedmsa: int          # the original's local batch size per method
    batch_fedsam: int
    builder: str | None        # "module:Class" in fedfms_jax.data.builders; None: made in memory
    paper: bool = False        # one of the FedFMS paper's federations

    def batch_size(self, method: str) -> int:
        return {"fedmsa": self.batch_fedmsa, "fedsam": self.batch_fedsam}[method]


FEDERATIONS: dict[str, FederationInfo] = {f.name: f for f in (
    FederationInfo("prostate", ("BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL"), 1, 4, 6,
                   "prostate:FedfmsProstate", paper=True),
    FederationInfo("fundus", ("REFUGE", "ORIGA", "G1020", "Drishti-GS1"), 2, 4, 6,
                   "fundus:FedfmsFundus", paper=True),
    FederationInfo("nuclei", ("PanNuke2Adrenal_gland", "PanNuke2Esophagus", "PanNuke3Bile-duct",
                              "PanNuke3Uterus", "MoNuSAC2020", "TNBC", "MoNuSAC2018"), 1, 4, 4,
                   "nuclei:FedfmsNuclei", paper=True),
    FederationInfo("fets", ("1", "6", "18", "21"), 1, 8, 6, "fets:FedfmsFets", paper=True),
    FederationInfo("ctlung", ("1", "2", "3", "4", "5"), 1, 4, 6, "ctlung:FedfmsCtlung", paper=True),
    FederationInfo("isic", (), 1, 4, 6, "isic:FedfmsIsic", paper=True),
    FederationInfo("chaos", ("CT", "MR"), 1, 4, 6, "chaos:FedfmsChaos", paper=True),
    FederationInfo("nuclei_demo", ("stardist_left", "stardist_right", "napari_upper", "napari_middle",
                                   "napari_deep"), 1, 4, 4, "nuclei_demo:FedfmsNucleiDemo"),
    FederationInfo("synthetic", (), 1, 2, 2, None),
)}

PAPER_FEDERATIONS = tuple(name for name, f in FEDERATIONS.items() if f.paper)


def federation_info(name: str) -> FederationInfo:
    if name not in FEDERATIONS:
        raise KeyError(f"unknown federation {name!r}; known: {', '.join(FEDERATIONS)}")
    return FEDERATIONS[name]
