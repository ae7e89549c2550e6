"""Make `import segment_anything` work with the CPU torch here (no torchvision)."""
import sys
import types

from tests.conftest import stub_torchvision


def import_segment_anything():
    stub_torchvision()
    if "torchvision.ops" not in sys.modules:  # the automatic mask generator imports these too
        ops = types.ModuleType("torchvision.ops")
        boxes = types.ModuleType("torchvision.ops.boxes")
        boxes.batched_nms = boxes.box_area = None
        ops.boxes = boxes
        sys.modules["torchvision"].ops = ops
        sys.modules.update({"torchvision.ops": ops, "torchvision.ops.boxes": boxes})
    import segment_anything

    return segment_anything
