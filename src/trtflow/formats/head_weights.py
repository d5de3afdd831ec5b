"""The head weights folder as a contract between the build and run sides: its file names and manifest
version, the tensors a manifest's layers read, and `load_head`, which reads a folder back and refuses one
whose tensors are not exactly those the layers need, or whose bytes differ from the recorded sha256s.
`trtflow.build.weights` writes such folders (rule `weights`); the heads and executors read them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

MANIFEST = "manifest.json"
SAFETENSORS = "head.safetensors"
WTS = "head.wts"
FORMATS = ("safetensors", "wts")
MANIFEST_VERSION = 1


class HeadWeightsError(ValueError):
    """The head weights folder, or the model they come from, cannot make the API-built head."""


# --------------------------------------------------------------------------- feature levels


def layer_tensor_shapes(layer: dict) -> dict[str, tuple[int, ...]]:
    """The tensors a layer spec reads, with their shapes."""
    if layer["kind"] == "linear":
        return {
            f"{layer['name']}.weight": (layer["out_features"], layer["in_features"]),
            f"{layer['name']}.bias": (layer["out_features"],),
        }
    if layer["kind"] == "conv2d":
        return {
            f"{layer['name']}.weight": (
                layer["out_channels"],
                layer["in_channels"] // layer["groups"],
                *layer["kernel_size"],
            ),
            f"{layer['name']}.bias": (layer["out_channels"],),
        }
    return {}


def required_tensors(manifest: Mapping) -> dict[str, tuple[int, ...]]:
    """Every tensor the head builders read, by name, with its shape: exactly the box head + predictor."""
    shapes = {}
    for layer in [*manifest["box_head"]["layers"], *manifest["box_predictor"].values()]:
        shapes.update(layer_tensor_shapes(layer))
    return shapes


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's little-endian bytes in C order."""
    array = tensor.detach().cpu().contiguous().numpy()
    return hashlib.sha256(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


# --------------------------------------------------------------------------- tensorrtx .wts


def write_wts(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """tensorrtx text format: a count line, then per tensor ``name len hex hex …`` (big-endian float32)."""
    with open(path, "wb") as f:
        f.write(f"{len(tensors)}\n".encode())
        for name, tensor in tensors.items():
            if any(c.isspace() for c in name):
                raise HeadWeightsError(f"tensor name {name!r} contains whitespace; .wts cannot hold it")
            words = np.ascontiguousarray(tensor.detach().cpu().float().numpy().ravel(), dtype=">f4")
            hex_digits = np.frombuffer(words.tobytes().hex().encode(), dtype=np.uint8).reshape(-1, 8)
            spaced = np.concatenate([np.full((len(hex_digits), 1), ord(" "), np.uint8), hex_digits], axis=1)
            f.write(f"{name} {words.size}".encode() + spaced.tobytes() + b"\n")


def read_wts(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat float32 arrays by name from a tensorrtx .wts file (shapes live in the manifest)."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    try:
        count = int(lines[0])
    except (IndexError, ValueError):
        raise HeadWeightsError(f"{path}: first line must be the tensor count") from None
    body = [line for line in lines[1:] if line.strip()]
    if len(body) != count:
        raise HeadWeightsError(f"{path}: header says {count} tensors, file has {len(body)}; re-export it")
    tensors = {}
    for line in body:
        name, size, digits = (line.split(maxsplit=2) + [b""])[:3]
        try:
            data = bytes.fromhex(digits.decode())
        except ValueError:
            raise HeadWeightsError(f"{path}: tensor {name.decode()} has non-hex data") from None
        if len(data) != 4 * int(size):
            raise HeadWeightsError(
                f"{path}: tensor {name.decode()} declares {int(size)} values, holds {len(data) / 4:g}; re-export it"
            )
        tensors[name.decode()] = np.frombuffer(data, dtype=">f4").astype("<f4")
    return tensors


# --------------------------------------------------------------------------- load


def check_head_tensors(manifest: Mapping, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise naming every missing/extra tensor, wrong shape, or sha256 mismatch."""
    expected = required_tensors(manifest)
    recorded = {entry["name"]: entry for entry in manifest["tensors"]}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise HeadWeightsError(
            f"{source}: the head reads exactly {len(expected)} tensors; "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra}" if extra else "")
            + " — re-export with the `weights` rule"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise HeadWeightsError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, the head "
                f"needs {shape}; re-export with the `weights` rule"
            )
        if name not in recorded or recorded[name]["sha256"] != tensor_sha256(tensors[name]):
            raise HeadWeightsError(
                f"{source}: tensor {name} does not match its sha256 in {MANIFEST}; "
                "the files are from different exports — re-export with the `weights` rule"
            )


def load_head(directory: str | os.PathLike, *, source: str = "safetensors") -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) from an export folder, checked against the manifest (names, shapes, sha256)."""
    folder = Path(directory)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise HeadWeightsError(f"{manifest_path} not found; run the `weights` rule (snakemake {manifest_path})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise HeadWeightsError(
            f"{manifest_path}: manifest version {manifest.get('version')}, this trtflow "
            f"reads {MANIFEST_VERSION}; re-export with the `weights` rule"
        )
    if source not in manifest["files"]:
        raise HeadWeightsError(
            f"{manifest_path}: no {source!r} file was exported (have {list(manifest['files'])}); "
            "add it to config weights.format"
        )
    path = folder / manifest["files"][source]
    if source == "safetensors":
        tensors = load_file(str(path))
    else:
        shapes = {entry["name"]: entry["shape"] for entry in manifest["tensors"]}
        tensors = {
            name: torch.from_numpy(flat.reshape(shapes.get(name, flat.shape))) for name, flat in read_wts(path).items()
        }
    check_head_tensors(manifest, tensors, str(path))
    return manifest, tensors
