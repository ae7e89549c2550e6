"""dice.png and TensorBoard event files from metrics.jsonl records."""
import struct

import numpy as np
from PIL import Image

from fedfms_jax import curves


def _records():
    ev = lambda d: {"sites": {"a": {"dice": d, "iou": d / 2}, "b": {"dice": d + 0.1}},  # noqa: E731
                    "unseen": {"dice": d / 2, "dice_thresh_avg": d / 3}, "average": {"dice": d}}
    return [{"round": 0, "eval": ev(0.1)},
            {"round": 1, "client_loss": {"a": 0.9, "b": 0.8}, "seconds": 2.0,
             "comm_bytes": {"up_per_client": 1000, "down_per_client": 1000, "total": 4000}},
            {"round": 2, "client_loss": {"a": 0.7, "b": 0.6}, "seconds": 1.5,
             "comm_bytes": {"up_per_client": 1000, "down_per_client": 1000, "total": 4000}, "eval": ev(0.5)}]


def event_scalars(logdir):
    """tag -> [(step, value)] read straight from the event files (TFRecord framing)."""
    from tensorboardX.proto import event_pb2
    out = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_dice_series_follows_the_evaluated_rounds():
    series = curves.dice_series(_records())
    assert series["a (validation)"] == ([0, 2], [0.1, 0.5])
    assert series["unseen site"] == ([0, 2], [0.05, 0.25])
    assert set(series) == {"a (validation)", "b (validation)", "unseen site"}


def test_dice_plot_is_a_png_and_needs_an_evaluation(tmp_path):
    assert curves.write_dice_plot(_records()[1:2], tmp_path / "none.png") is None
    path = curves.write_dice_plot(_records(), tmp_path / curves.DICE_PLOT, title="run")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5  # something was drawn
    assert not list(tmp_path.glob("*.tmp.png"))


def test_tensorboard_events_hold_every_scalar(tmp_path):
    log = curves.TensorBoardLog(tmp_path)
    for rec in _records():
        log.add(rec)
    log.close()
    scalars = event_scalars(tmp_path)
    assert scalars["loss/a"] == [(1, np.float32(0.9)), (2, np.float32(0.7))]
    assert [s for s, _ in scalars["dice/unseen"]] == [0, 2]
    assert scalars["dice/b"][-1][1] == np.float32(0.6)
    assert scalars["dice_thresh_avg/unseen"][0] == (0, np.float32(0.1 / 3))
    assert scalars["comm/bytes_per_client_each_way"] == [(1, 1000.0), (2, 1000.0)]
    assert "time/round_seconds" in scalars and "iou/a" in scalars
