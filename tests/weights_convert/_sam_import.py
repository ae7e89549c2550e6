"""Make `import segment_anything` work with the CPU torch here (no torchvision)."""
from tests.conftest import stub_torchvision


def import_segment_anything():
    stub_torchvision()
    import segment_anything

    return segment_anything
