"""Dependencies point one way: run assembly -> weights_convert -> models."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("fedfms_jax.train", "fedfms_jax.evaluate", "fedfms_jax.predict", "fedfms_jax.benchmark",
            "fedfms_jax.run_state", "fedfms_jax.model_init", "fedfms_jax.trained_model")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_models_import_nothing_from_weights_convert():
    for path in sorted((REPO / "fedfms_jax" / "models").glob("*.py")):
        bad = [m for m in _imports(path) if m.split(".")[0] == "weights_convert"]
        assert not bad, f"{path.name} imports {bad}"


def test_weights_convert_imports_no_run_assembly_or_command():
    modules = [f"weights_convert.{p.stem}" for p in sorted((REPO / "weights_convert").glob("*.py"))
               if p.stem != "__init__"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(sorted(m for m in sys.modules if m in {COMMANDS!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
