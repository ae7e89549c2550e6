"""A run's learning curves, from the records it appends to metrics.jsonl: `dice.png`
(Dice at probability 0.5 per site and round) and TensorBoard event files under
`WORKDIR/tensorboard/` (`tensorboard --logdir runs/` shows every run), written with
tensorboardX so no TensorFlow is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

DICE_PLOT = "dice.png"
TENSORBOARD_DIR = "tensorboard"


def dice_series(records: Iterable[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """label -> (rounds, Dice) over the records that carry an evaluation."""
    series: dict[str, tuple[list[int], list[float]]] = {}

    def add(label: str, round_: int, block: dict) -> None:
        if "dice" in block:
            rounds, values = series.setdefault(label, ([], []))
            rounds.append(round_)
            values.append(float(block["dice"]))

    for rec in sorted(records, key=lambda r: r["round"]):
        ev = rec.get("eval")
        if not ev:
            continue
        for site, block in ev.get("sites", {}).items():
            add(f"{site} (validation)", rec["round"], block)
        if "unseen" in ev:
            add("unseen site", rec["round"], ev["unseen"])
    return series


def write_dice_plot(records: Iterable[dict], path: Path, title: str = "") -> Path | None:
    """Dice per round per site as a PNG; None when no evaluation has been recorded yet."""
    series = dice_series(records)
    if not series:
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, (rounds, values) in series.items():
        unseen = label == "unseen site"
        ax.plot(rounds, values, marker="o", linewidth=2.4 if unseen else 1.3,
                color="black" if unseen else None, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("Dice (probability 0.5)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)  # never a half-written plot
    return path


class TensorBoardLog:
    """Scalars of each round record: client losses, seconds, bytes sent, Dice/IoU per site.
    The event file is opened with the first record, so a run with nothing left to do
    leaves its work dir untouched."""

    def __init__(self, logdir: Path):
        self.logdir, self.writer = logdir, None

    def add(self, record: dict) -> None:
        if self.writer is None:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(self.logdir))
        step = record["round"]
        scalar = self.writer.add_scalar
        for client, loss in record.get("client_loss", {}).items():
            scalar(f"loss/{client}", loss, step)
        if "seconds" in record and step > 0:
            scalar("time/round_seconds", record["seconds"], step)
        if "comm_bytes" in record:
            scalar("comm/bytes_per_client_each_way", record["comm_bytes"]["up_per_client"], step)
        ev = record.get("eval") or {}
        blocks = {f"{site}": b for site, b in ev.get("sites", {}).items()}
        if "unseen" in ev:
            blocks["unseen"] = ev["unseen"]
        if ev.get("average"):
            blocks["validation_average"] = ev["average"]
        for name, block in blocks.items():
            for metric in ("dice", "iou", "dice_thresh_avg", "iou_thresh_avg"):
                if metric in block:
                    scalar(f"{metric}/{name}", block[metric], step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
