"""Writing files so that a reader never sees half of one: write under a temporary name beside the target,
then rename (``os.replace`` is atomic within a file system). A crash leaves the old file, or none. And a
file's SHA-256 (``sha256_of``), which the writers of checkpoints and shards record so that a reader can tell a
whole file from a damaged one."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def temp_path(path: Path) -> Path:
    """A hidden name beside ``path`` for its unfinished version; keeps the suffix for format detection."""
    return path.with_name(f".{path.name}.tmp{path.suffix}")


def write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_image(image, path: Path, format: str | None = None) -> None:
    """A PIL image; the format follows the file name's suffix unless given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    image.save(tmp, format=format)
    os.replace(tmp, path)


def save_safetensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = temp_path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` at ``final``, replacing what is there; at every moment either the old
    or the new folder is complete under some name."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
