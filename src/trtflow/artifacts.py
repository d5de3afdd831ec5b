"""Writing artifacts: whole or not at all, a plain message when the disk fills up, and the software that made them.

Every file a stage writes goes through `atomic_write`: it is built under a hidden name beside its
target, flushed to the disk, then renamed into place. A reader (or the next Snakemake run) sees the
old file or the new one, never half of one; a failure removes the hidden file. Snakemake deletes the
outputs of a failed job itself, so together nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

# errno values that mean "no room left": ENOSPC (device full) and EDQUOT (user quota used up)
NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Distributions whose versions decide the numbers in an artifact (name prefixes, as pip spells them).
SOFTWARE = ("torch", "torchvision", "onnx", "onnxruntime", "onnxslim", "numpy", "opencv", "pycocotools", "tensorrt")


class DiskFullError(OSError):
    """The disk (or quota) holding an artifact ran out of space while writing it."""

    def __init__(self, path: str | os.PathLike, error: OSError):
        path = Path(path)
        what = "disk quota is used up" if error.errno != errno.ENOSPC else "disk is full"
        free = _free_space(path.parent)
        super().__init__(
            f"{path}: the {what} (no space left on the device holding {path.parent}{free}); nothing was written. "
            "Free some space there (old results/ or logs/, pip and torch caches) or move results/ to a larger "
            "disk, then run snakemake again"
        )
        self.errno, self.filename = error.errno, str(path)

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28] ..." framing
        return self.args[0]


def _free_space(folder: Path) -> str:
    with contextlib.suppress(OSError):
        return f", {shutil.disk_usage(folder).free / 2**20:.0f} MiB free now"
    return ""


@contextlib.contextmanager
def disk_full_named(path: str | os.PathLike) -> Iterator[None]:
    """Turn an out-of-space OSError raised inside the block into a DiskFullError naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as error:
        if error.errno in NO_SPACE:
            raise DiskFullError(path, error) from error
        raise


def staging_path(path: str | os.PathLike) -> Path:
    """A hidden, unique sibling of `path` to build it under before renaming it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Create `path` through `write(staging)`, which writes the whole content to the path it is given.

    The staged file is flushed to the disk before the rename, so a full disk or a crash surfaces here
    and not as a truncated artifact later; on any failure the staged file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    try:
        with disk_full_named(path):
            write(staging)
            with open(staging, "rb+") as stream:
                os.fsync(stream.fileno())
            os.chmod(staging, 0o666 & ~_umask())
            os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda staging: staging.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, payload, *, indent: int = 2, sort_keys: bool = True) -> None:
    """`payload` as JSON at `path`, atomically."""
    write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")


def files_sha256(*paths: str | os.PathLike) -> str:
    """sha256 over the bytes of the files, in order; of one file, its plain sha256."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def installed_versions(prefixes: tuple[str, ...] = SOFTWARE) -> dict[str, str]:
    """{distribution: version} of the installed distributions whose names start with one of `prefixes`.

    Read from the package metadata without importing anything (a few ms), so rule files can use it
    at DAG time: `tensorrt` matches tensorrt, tensorrt-cu12/13 and the tensorrt-rtx packages alike.
    """
    prefixes = tuple(prefix.lower().replace("-", "_") for prefix in prefixes)
    found = {}
    for distribution in metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower().replace("-", "_")
        if name.startswith(prefixes):
            found[name] = distribution.version
    return dict(sorted(found.items()))


def running_code(package: str = "trtflow") -> dict:
    """The `package` code this process runs: the names of its loaded modules and one sha256 over each module's
    name and the bytes of its file, in name order. Two runs with equal hashes ran the same trtflow code, wherever
    it was imported from (a clone, an installed copy)."""
    modules = sorted(
        (name, module.__file__)
        for name, module in list(sys.modules.items())
        if (name == package or name.startswith(f"{package}.")) and getattr(module, "__file__", None)
    )
    digest = hashlib.sha256()
    for name, path in modules:
        digest.update(f"{name}\n{files_sha256(path)}\n".encode())
    return {"sha256": digest.hexdigest(), "modules": [name for name, _ in modules]}


def software_versions() -> dict:
    """The software stack an artifact was made with, for its JSON: Python, the numeric libraries and the trtflow
    code that ran (`running_code`).

    Recorded beside the numbers so that a backend, torch or onnxruntime upgrade, or an edit of trtflow, shows up
    in a diff of two runs' artifacts.
    """
    return {"python": platform.python_version(), **installed_versions(), "trtflow_code": running_code()}
