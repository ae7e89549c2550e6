"""Work directory bookkeeping: config fingerprint, refusal of foreign dirs, writability.

A work dir belongs to exactly one config. Re-running the same command resumes; a
different config is refused (exit 2) and nothing in the directory is touched. Configs
are ConfigDicts everywhere else; here they become plain JSON (config.json) and back.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import ml_collections

from fedfms_jax import run_config
from fedfms_jax.cli_errors import UsageError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CKPT_DIR = "checkpoints"
OVERLAY_DIR = "overlays"
# The round settings a plan=auto run chose (memory_plan): a resumed run keeps them, and
# every command that rebuilds the run from the work dir sees them.
PLAN_FILE = "plan.json"


def to_plain(cfg) -> dict:
    """A config (ConfigDict or dict) as JSON-ready dicts and lists, keys sorted."""
    def conv(v):
        if isinstance(v, (ml_collections.ConfigDict, Mapping)):
            return {k: conv(v[k]) for k in sorted(v.keys())}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def canonical_json(cfg) -> str:
    return json.dumps(to_plain(cfg), sort_keys=True, indent=1)


def fingerprint(cfg) -> str:
    return hashlib.sha256(json.dumps(to_plain(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_writable(path: Path) -> None:
    """Raise UsageError unless `path` (or the nearest existing parent) is writable."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"work dir {path} is not a directory ({probe} is a file)")
    try:
        fd, name = tempfile.mkstemp(prefix=".write_probe_", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise UsageError(f"work dir {path} is not writable ({exc.strerror or exc})") from None


def prepare(workdir: str | os.PathLike, cfg) -> tuple[Path, bool]:
    """Check `workdir` for `cfg` before any file is written.

    Returns (path, resuming). Refuses a directory made with another config, or a
    non-empty directory that is no work dir at all. A config.json written before some
    field existed matches when the new config has that field's default.
    """
    path = Path(workdir)
    check_writable(path)
    cfg_file = path / CONFIG_FILE
    if cfg_file.exists():
        try:
            old = to_plain(run_config.from_json(json.loads(cfg_file.read_text())))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise UsageError(f"{cfg_file} is unreadable ({exc}); refusing to reuse this work dir") from None
        new = to_plain(cfg)
        if old != new:
            changes = _diff(old, new)
            shown = "; ".join(changes[:3]) + (f"; +{len(changes) - 3} more" if len(changes) > 3 else "")
            raise UsageError(f"work dir {path} was made with a different config ({shown}); "
                             "use a new --workdir")
        return path, True
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"work dir {path} is not empty and has no {CONFIG_FILE}; refusing to overwrite it")
    return path, False


def create(path: Path, cfg) -> None:
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / CONFIG_FILE, canonical_json(cfg) + "\n")


def write_atomic(target: Path, text: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """A work dir's config as the run ran it (fields it predates take their defaults, and
    the memory plan's settings, if it chose any, are applied)."""
    cfg_file = Path(workdir) / CONFIG_FILE
    if not cfg_file.is_file():
        raise UsageError(f"{workdir} is not a training work dir (no {CONFIG_FILE})")
    try:
        cfg = run_config.from_json(json.loads(cfg_file.read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise UsageError(f"{cfg_file} is unreadable ({exc})") from None
    settings = read_plan(workdir)
    return run_config.with_plan_settings(cfg, settings) if settings else cfg


def write_plan(workdir: Path, settings: Mapping) -> None:
    write_atomic(Path(workdir) / PLAN_FILE, json.dumps(dict(settings), sort_keys=True) + "\n")


def read_plan(workdir: str | os.PathLike) -> dict | None:
    """The settings a memory plan chose for this work dir, None if it chose none."""
    plan_file = Path(workdir) / PLAN_FILE
    if not plan_file.is_file():
        return None
    try:
        return json.loads(plan_file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{plan_file} is unreadable ({exc}); delete it to plan again") from None


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines past the restored round go."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, last_round: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if rec.get("round", 0) <= last_round:
                keep.append(line)
        write_atomic(self.path, "".join(l + "\n" for l in keep))

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]
