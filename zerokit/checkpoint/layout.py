"""Names inside a checkpoint directory, and which tag to load.

    save_dir/
      latest                  the tag of the newest complete checkpoint (written last)
      global_step1000/        one tag: rank_00000.pt … rank_<N-1>.pt, metadata.json, manifest.json
      .incomplete-<tag>/      a save in progress; renamed to <tag> once its manifest is written
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.files import fsync_directory, write_bytes_atomically
from zerokit.checkpoint.manifest import MANIFEST, read_manifest

LATEST = "latest"
METADATA = "metadata.json"
_STAGING = ".incomplete-"
_REPLACED = ".replaced-"
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def default_tag(global_step: int) -> str:
    return f"global_step{global_step}"


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG.fullmatch(tag) or tag == LATEST:
        raise CheckpointError(
            f"checkpoint tag {tag!r} is invalid: use letters, digits, '.', '_' and '-', starting with a letter "
            f"or digit, and not {LATEST!r}."
        )
    return tag


def staging_dir(save_dir: str, tag: str) -> str:
    return os.path.join(save_dir, _STAGING + tag)


def latest_tag(checkpoint_dir: str) -> Optional[str]:
    """The tag that `latest` names, or None when there is none."""
    path = os.path.join(checkpoint_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip() or None


def complete_tags(checkpoint_dir: str) -> list[str]:
    """Tags in the directory that have a manifest, in name order."""
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(
        name for name in os.listdir(checkpoint_dir)
        if not name.startswith(".") and os.path.isfile(os.path.join(checkpoint_dir, name, MANIFEST))
    )


def candidate_tags(checkpoint_dir: str, tag: Optional[str], fallback_to_previous: bool) -> list[str]:
    """The tag to load (`tag`, else the one `latest` names) and, with fallback, the complete
    tags older than it (all of them when its age is unknown), newest first."""
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist.")
    available = complete_tags(checkpoint_dir)
    wanted = tag if tag is not None else latest_tag(checkpoint_dir)
    if wanted is None and not (fallback_to_previous and available):
        hint = (f" Complete tags there: {', '.join(available)}; pass tag=…." if available
                else " It holds no complete checkpoint.")
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} has no {LATEST!r} file.{hint}")
    if wanted is not None and not os.path.isdir(os.path.join(checkpoint_dir, wanted)) and not fallback_to_previous:
        hint = f"complete tags there: {', '.join(available)}" if available else "it holds no complete checkpoint"
        raise CheckpointError(f"checkpoint {os.path.join(checkpoint_dir, wanted)} does not exist; {hint}.")
    if not fallback_to_previous:
        return [wanted]

    ages = {name: _age(os.path.join(checkpoint_dir, name)) for name in {*available, *([wanted] if wanted else [])}}
    older = [name for name in available if name != wanted and ages[name] is not None]
    if wanted is not None and ages[wanted] is not None:
        older = [name for name in older if ages[name] < ages[wanted]]
    older.sort(key=lambda name: ages[name], reverse=True)
    return ([wanted] if wanted is not None else []) + older


def _age(tag_dir: str) -> Optional[tuple[int, float]]:
    """(global step, creation time) of a complete tag, None when unknown."""
    try:
        manifest = read_manifest(tag_dir)
    except CheckpointError:
        return None
    return manifest.global_step, manifest.created


def prepare_staging(save_dir: str, tag: str) -> str:
    """An empty staging directory for a new save. Leftovers of crashed saves are removed: no
    other save can be in flight, each save waits for the previous one."""
    os.makedirs(save_dir, exist_ok=True)
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(_REPLACED) and not os.path.exists(os.path.join(save_dir, name[len(_REPLACED):])):
            os.rename(path, os.path.join(save_dir, name[len(_REPLACED):]))  # a crash between publish's renames
        elif name.startswith((_STAGING, _REPLACED)):
            shutil.rmtree(path, ignore_errors=True)
    staging = staging_dir(save_dir, tag)
    os.makedirs(staging)
    return staging


def publish(save_dir: str, staging: str, tag: str) -> str:
    """Move a complete staging directory to its tag, replacing an older save of the same tag only
    now that the new one is complete, then point `latest` at it."""
    final = os.path.join(save_dir, tag)
    replaced = os.path.join(save_dir, _REPLACED + tag)
    if os.path.exists(final):
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        try:
            os.rename(staging, final)
        except BaseException:
            os.rename(replaced, final)
            raise
    else:
        os.rename(staging, final)
    fsync_directory(save_dir)
    shutil.rmtree(replaced, ignore_errors=True)
    write_bytes_atomically(os.path.join(save_dir, LATEST), tag.encode())
    return final
