"""`--config FILE[:ARGS]` and `--config.field=value` handling for the command-line tools.

Config files are ml_collections Python files with `get_config(arg)`. Overrides must name
an existing field (nested with dots) and are parsed with that field's type, so a typo
is rejected instead of silently creating a new field.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

import ml_collections

from fedfms_jax.cli_errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_config_path(name: str = "demo") -> Path:
    for root in (REPO_ROOT, Path.cwd()):
        path = root / "configs" / f"{name}.py"
        if path.exists():
            return path
    raise UsageError(f"cannot find configs/{name}.py (run from the repository root or pass --config)")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the ConfigDict its get_config(arg) returns."""
    path_text, _, arg = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"config file not found: {path_text}")
    # Config files import their siblings as `configs.common`: make the folder above importable.
    parent = str(path.resolve().parent.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    mod_name = f"_fedfms_config_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot load config {path_text}: {exc}") from exc
    if not hasattr(module, "get_config"):
        raise UsageError(f"config {path_text} has no get_config()")
    cfg = module.get_config(arg or None) if arg else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UsageError(f"config {path_text}: get_config() must return a ConfigDict")
    return cfg


def parse_config_args(arg: str | None, defaults: dict) -> dict:
    """'method=fedmsa,unseen=2' -> dict, typed like `defaults`; unknown keys rejected."""
    out = dict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise UsageError(f"config argument '{item}' is not key=value")
        if key not in defaults:
            raise UsageError(f"unknown config argument '{key}' (known: {', '.join(sorted(defaults))})")
        out[key] = coerce(value.strip(), defaults[key], key)
    return out


def coerce(text: str, like, name: str):
    """Parse `text` as the type of the existing value `like`."""
    try:
        if isinstance(like, bool):
            low = text.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
        if isinstance(like, str):
            return text
        if isinstance(like, (tuple, list)):
            value = ast.literal_eval(text) if text else ()
            value = value if isinstance(value, (tuple, list)) else (value,)
            return type(like)(value)
        if like is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
    except (ValueError, SyntaxError):
        pass
    raise UsageError(f"config field '{name}': cannot parse '{text}' as {type(like).__name__}")


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> None:
    for dotted, text in overrides:
        node = cfg
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise UsageError(f"unknown config field '{dotted}'")
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise UsageError(f"unknown config field '{dotted}'")
        with node.unlocked():
            node[leaf] = coerce(text, node[leaf], dotted)


def split_argv(argv: Sequence[str], flags: Sequence[str]) -> tuple[dict, list[tuple[str, str]]]:
    """Split argv into known `--flag value` pairs and `--config.x=v` overrides."""
    values: dict = {}
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument '{arg}'")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise UsageError(f"--{name} needs a value")
            value = args[i + 1]
            i += 1
        if name.startswith("config."):
            overrides.append((name[len("config."):], value))
        elif name in flags:
            values[name] = value
        else:
            raise UsageError(f"unknown flag --{name} (known: {', '.join('--' + f for f in flags)}, --config.<field>)")
        i += 1
    return values, overrides


def to_plain(cfg) -> dict:
    """ConfigDict -> JSON-ready dict (tuples become lists)."""
    def conv(v):
        if isinstance(v, ml_collections.ConfigDict):
            return {k: conv(v[k]) for k in sorted(v.keys())}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)
