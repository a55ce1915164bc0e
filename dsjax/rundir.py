"""The run directory (--out): the checks made before anything compiles, and what a resumed run reads back
from it (its config.json and metrics.jsonl)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from dsjax.config import Config, ConfigError

RESUME_SENSITIVE = ("data.source", "data.path", "data.tokenizer", "data.val_fraction", "train.seed", "train.seq_len")


def changed_data_settings(out_dir: Path, config: Config) -> list[str]:
    """The settings that choose the data (RESUME_SENSITIVE) that differ from the run's saved config.json,
    as 'field old -> new' (none when there is no readable config.json)."""
    try:
        saved = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    now = config.to_dict()
    changed = []
    for key in RESUME_SENSITIVE:
        section, field = key.split(".")
        old, new = saved.get(section, {}).get(field, now[section][field]), now[section][field]
        if old != new:
            changed.append(f"{key} {old!r} -> {new!r}")
    return changed


def last_logged_step(out_dir: Path) -> int:
    """The last training step an earlier attempt logged in out_dir/metrics.jsonl (0 if none): steps up to
    it that this attempt runs again are time lost to the restart."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "loss" in record:
                steps.append(int(record["step"]))
    return max(steps)


def holds_checkpoints(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_writable_dir(path: Path, name: str) -> None:
    """ConfigError unless `path` is a writable directory or can be created as one: checked before anything
    compiles or trains, so the saves cannot fail after the training they were to keep."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name} ({path}) is a file; checkpoints are saved into a directory.")
    ancestor = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is not a directory" if not ancestor.is_dir() else "is not writable"
        raise ConfigError(f"{name} ({path}) cannot take checkpoints: {ancestor} {what}.")


def check_out(out: str | Path, resumable: bool = False) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out={str(out)!r} is a file; the run directory must be a directory.")
    ancestor = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        what = "is not a directory" if not ancestor.is_dir() else "is not writable"
        if ancestor == path.absolute():
            raise ConfigError(f"--out={str(out)!r} {what}.")
        raise ConfigError(f"--out={str(out)!r} cannot be created: {ancestor} {what}.")
    if path.is_dir() and any(path.iterdir()):
        if resumable and (path / "config.json").is_file():
            return path  # an earlier run of dsjax with checkpoints: resume it
        if os.environ.get("DSJAX_RESTART", "0") not in ("", "0") and (path / "config.json").is_file():
            return path  # dsjax.launch restarting a job that died before its first checkpoint: start over
        raise ConfigError(
            f"--out={str(out)!r} already holds files and nothing to resume (no checkpoint, or "
            "--checkpoint.restore=none / checkpoint.enabled=false); dsjax will not mix two runs in one "
            "directory. Choose a new --out (or remove the old run)."
        )
    return path


def default_out(preset_name: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{preset_name}"
