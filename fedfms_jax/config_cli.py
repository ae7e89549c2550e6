"""The command lines: `--config NAME|FILE[:ARGS]`, `--config.field=value`, other flags, `--help`.

Config files are ml_collections Python files with `get_config(arg)`, named by path or,
for the ones that come with the library (`configs/`, installed as `fedfms_jax.configs`),
by name. Overrides must name an existing field (nested with dots) and are parsed with
that field's type, so a typo is rejected instead of silently creating a new field.

A small parser rather than absl's config_flags: every command is also called in-process
(tests, the Flower server app) with its own argv, bad input must end in one line (absl
prints a usage dump), and absl's flags are process-global.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping, Sequence

import ml_collections

from fedfms_jax import run_config
from fedfms_jax.cli_errors import HelpRequested, UsageError

HELP_FLAGS = ("-h", "--help")


# ---------------------------------------------------------------------------- config files
def configs_dir() -> Path:
    """The folder of the library's config files: the checkout's configs/ when running
    from a source tree, else the installed `fedfms_jax.configs` package."""
    checkout = Path(__file__).resolve().parents[1]  # the folder holding this package
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    spec = importlib.util.find_spec("fedfms_jax.configs")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the library's configs are not installed; pass --config path/to/config.py")
    return Path(list(spec.submodule_search_locations)[0])


def config_names() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.py") if not p.stem.startswith("_"))


def config_path(name_or_path: str) -> Path:
    """A config file named by path, or by name (`prostate`) among the library's configs.

    `configs/<name>.py` that does not exist relative to the working directory is the
    library's own file of that name (the same file, installed)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    by_name = path.suffix != ".py" and len(path.parts) == 1
    if by_name or (path.parent.name == "configs" and path.suffix == ".py"):
        candidate = configs_dir() / f"{path.stem if path.suffix == '.py' else name_or_path}.py"
        if candidate.is_file():
            return candidate
        if by_name:
            raise UsageError(f"no config named '{name_or_path}' (known: {', '.join(config_names())}; "
                             f"or pass a file path)")
    raise UsageError(f"config file not found: {name_or_path}")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`NAME|path/to/config.py[:arg]` -> the ConfigDict its get_config(arg) returns."""
    name_or_path, _, arg = spec.partition(":")
    path = config_path(name_or_path)
    mod_name = f"_fedfms_config_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot load config {name_or_path}: {exc}") from exc
    if not hasattr(module, "get_config"):
        raise UsageError(f"config {name_or_path} has no get_config()")
    cfg = module.get_config(arg) if arg else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UsageError(f"config {name_or_path}: get_config() must return a ConfigDict")
    return cfg


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
            node[leaf] = run_config.coerce(text, node[leaf], dotted)


def load_training_config(spec: str, overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
    """The config file's config with the overrides, shrunk when `tiny`; a `protocol` named
    on the command line (or tiny's "clean") resets the preset's fields. Overrides still win."""
    cfg = load_config_file(spec)
    apply_overrides(cfg, overrides)
    tiny = cfg.get("tiny")  # a config without the field is no training config: validate says so
    named_protocol = [(k, v) for k, v in overrides if k == "protocol"]
    if tiny or named_protocol:
        with cfg.unlocked():
            if tiny:
                run_config.apply_tiny(cfg)
            apply_overrides(cfg, named_protocol)
            run_config.apply_protocol(cfg)
        apply_overrides(cfg, overrides)
    return cfg


# ---------------------------------------------------------------------------- flags
def split_argv(argv: Sequence[str], flags: Mapping) -> tuple[dict, list[tuple[str, str]]]:
    """Split argv into known `--flag value` pairs and `--config.x=v` overrides.

    `flags` holds the known flags' names (a mapping's keys: name -> (metavar, help))."""
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


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def config_spec_in(argv: Sequence[str]) -> str | None:
    """The --config value in argv, if any (read before the rest is checked, for --help)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def format_fields(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """`  --config.x=default` for every field, nested ones dotted."""
    lines = []
    for key in sorted(cfg.keys()):
        value = cfg[key]
        if isinstance(value, ml_collections.ConfigDict):
            lines += format_fields(value, f"{prefix}{key}.")
        else:
            lines.append(f"  --config.{prefix}{key}={value!r}")
    return lines


def help_text(prog: str, summary: str, flags: Mapping[str, tuple[str, str]], *,
              config: ml_collections.ConfigDict | None = None, config_label: str = "") -> str:
    """The text of `--help`: usage, the flags, and a config's fields with their defaults.

    `flags` maps each flag's name to (metavar, help)."""
    usage = " ".join(f"[--{name} {metavar}]" for name, (metavar, _) in flags.items())
    if config is not None:
        usage += " [--config.FIELD=VALUE ...]"
    lines = [f"usage: python -m {prog} {usage}".rstrip(), "", summary.strip(), "", "options:"]
    rows = [(f"--{name} {metavar}", text) for name, (metavar, text) in flags.items()]
    rows.append(("-h, --help", "show this help and exit"))
    width = max(len(r[0]) for r in rows) + 2
    lines += [f"  {left:<{width}}{text}" for left, text in rows]
    if config is not None:
        lines += ["", f"config fields of {config_label} and their defaults (override with --config.FIELD=VALUE):"]
        lines += format_fields(config)
    return "\n".join(lines) + "\n"


def raise_help(prog: str, summary: str, flags: Mapping[str, tuple[str, str]], argv: Sequence[str] = (),
               default_config: str | None = None) -> None:
    """Raise HelpRequested with the help text (run_cli prints it, exit 0). With a default
    config the fields of the one given by --config (or the default) are listed."""
    config, label = None, ""
    if default_config is not None:
        label = config_spec_in(argv) or default_config
        config = load_training_config(label, ())
    raise HelpRequested(help_text(prog, summary, flags, config=config, config_label=label))
