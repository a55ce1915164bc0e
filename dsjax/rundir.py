"""The run directory (--out): the checks made before anything compiles, and what a resumed run reads back
from it (its config.json and metrics.jsonl)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from dsjax.config import Config, ConfigError


def changed_data_settings(saved: dict, config: Config) -> list[str]:
    """The settings that choose the data which differ between the config a checkpoint was saved with
    (`saved`, its meta's config) and `config`, as 'field old -> new': data.source, the path and tokenizer
    where the source reads them (compared as absolute paths), data.val_fraction, train.seed and
    train.seq_len. Fields missing from `saved` count as unchanged."""
    now = config.to_dict()

    def value(tree, section: str, field: str):
        part = tree.get(section) if isinstance(tree, dict) else None
        got = part.get(field, now[section][field]) if isinstance(part, dict) else now[section][field]
        if field == "path" or (field == "tokenizer" and got != "bytes"):
            return os.path.abspath(os.path.expanduser(got)) if got else got
        return got

    source = now["data"]["source"]
    keys = [("data", "source"), ("train", "seed"), ("train", "seq_len")]
    if source != "synthetic":
        keys.append(("data", "val_fraction"))
    if source in ("text", "tokens"):
        keys.append(("data", "path"))
    if source == "text":
        keys.append(("data", "tokenizer"))
    changed = []
    for section, field in keys:
        old, new = value(saved, section, field), value(now, section, field)
        if old != new:
            changed.append(f"{section}.{field} {old!r} -> {new!r}")
    return changed


def _records(out_dir: Path) -> list[dict]:
    """The records of out_dir/metrics.jsonl that have an integer step, in order (unreadable lines skipped)."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def last_logged_step(out_dir: Path) -> int:
    """The last training step an earlier attempt logged in out_dir/metrics.jsonl (0 if none): steps up to
    it that this attempt runs again are time lost to the restart."""
    return max((r["step"] for r in _records(out_dir) if "loss" in r), default=0)


def finished(out_dir: Path | None, steps: int) -> bool:
    """Whether the last record in out_dir/metrics.jsonl is the final evaluation, at step `steps`: the last
    thing a run writes. (A later attempt writes its restored_from record first, so a run that was resumed
    after its final evaluation, and stopped again, is not taken as finished.)"""
    records = [] if out_dir is None else _records(out_dir)
    return bool(records) and records[-1]["step"] == steps and "eval_loss" in records[-1]


def holds_checkpoints(directory: Path) -> bool:
    try:
        return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())
    except OSError as err:
        raise ConfigError(f"the checkpoint directory {directory} cannot be read: {err.strerror or err}.") from None


def unwritable(path: Path) -> str | None:
    """None if `path` is a directory this user can write into, or can be created as one; else why not
    ('is a file', 'is not writable', 'cannot be created: PARENT is not a directory', ...)."""
    try:
        if path.exists() and not path.is_dir():
            return "is a file"
        ancestor = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
        what = "is not a directory" if not ancestor.is_dir() else None
        existing = os.R_OK if ancestor == path.absolute() else 0  # a run reads what is already there
        if what is None and not os.access(ancestor, os.W_OK | os.X_OK | existing):
            what = "is not writable"
    except OSError as err:  # e.g. a parent this user may not list
        return f"cannot be checked: {err.strerror or err}"
    if what is None:
        return None
    return what if ancestor == path.absolute() else f"cannot be created: {ancestor} {what}"


def check_writable_dir(path: Path, name: str) -> None:
    """ConfigError unless `path` is a writable directory or can be created as one: checked before anything
    compiles or trains, so the saves cannot fail after the training they were to keep."""
    why = unwritable(path)
    if why is not None:
        raise ConfigError(f"{name} ({path}) {why}; checkpoints are saved into a directory this run can write.")


def check_out(out: str | Path, resumable: bool = False) -> Path:
    """The run directory --out=`out` if a run may use it: new, empty, or an earlier run to resume
    (`resumable`); else a ConfigError that says why."""
    path = Path(out)
    why = unwritable(path)
    if why is not None:
        raise ConfigError(f"--out={str(out)!r} {why}; the run directory must be a directory this run can write.")
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
