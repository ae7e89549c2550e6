"""One federation registry: configs, data loading and the TFDS builders all read it."""
import ast
import re
from pathlib import Path

import pytest

from fedfms_jax.data import federations, registry
from fedfms_jax.data.builders import builder_class
from fedfms_jax.run_config import federation_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", [n for n, f in registry.FEDERATIONS.items() if f.builder])
def test_builders_take_sites_and_classes_from_the_registry(name):
    info, cls = registry.FEDERATIONS[name], builder_class(name)
    assert tuple(cls.SITES) == info.sites and cls.NUM_CLASSES == info.num_classes


@pytest.mark.parametrize("name", registry.PAPER_FEDERATIONS)
@pytest.mark.parametrize("method", ["fedmsa", "fedsam"])
def test_configs_take_classes_and_batch_sizes_from_the_registry(name, method):
    info = registry.FEDERATIONS[name]
    cfg = federation_config(name, f"method={method}")
    assert cfg.federation == name and cfg.num_classes == info.num_classes
    assert cfg.batch_size == info.batch_size(method)
    assert (ROOT / "configs" / f"{name}.py").is_file()


def test_paper_federations_and_their_batch_sizes():
    assert registry.PAPER_FEDERATIONS == ("prostate", "fundus", "nuclei", "fets", "ctlung", "isic", "chaos")
    assert registry.FEDERATIONS["fets"].batch_size("fedmsa") == 8
    assert registry.FEDERATIONS["fundus"].num_classes == 2


def test_data_loading_uses_the_registry():
    assert federations.FEDERATIONS is registry.FEDERATIONS
    with pytest.raises(KeyError, match="unknown federation 'nope'; known: prostate, fundus"):
        federations.get_federation("nope", image_size=64)
    fed = federations.get_federation("synthetic", image_size=64, num_sites=3, images_per_site=4)
    assert fed.sites == ["site0", "site1", "site2"]


def test_no_other_table_of_federation_names():
    """A second registry would list several federation names as string literals."""
    names = list(registry.FEDERATIONS)
    tables = []
    for path in sorted([*(ROOT / "fedfms_jax").rglob("*.py"), *(ROOT / "configs").glob("*.py")]):
        text = path.read_text()
        found = [n for n in names if re.search(rf"[\"']{n}[\"']", text)]
        if len(found) >= 4:
            tables.append(path.relative_to(ROOT).as_posix())
    assert tables == ["fedfms_jax/data/registry.py"]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_builders_and_federations_do_not_import_each_other():
    data = ROOT / "fedfms_jax" / "data"
    assert "fedfms_jax.data.federations" not in _imported_modules(data / "builders" / "__init__.py")
    for module in (data / "builders").glob("*.py"):
        assert "fedfms_jax.data.federations" not in _imported_modules(module), module.name
    assert "fedfms_jax.data.builders" in _imported_modules(data / "federations.py")
