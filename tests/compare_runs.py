"""Compare the results/ of two runs of the workflow, byte for byte, for a change that must not change behaviour.

    .venv/bin/python tests/compare_runs.py <before workdir> <after workdir>

Files of identical bytes are counted. The others are compared again with what a code change alone moves taken out:
`software.trtflow_code` (the hash of the code that ran), a plan JSON's `format` key and `build_seconds` in JSONs, the
`trtflow.software` metadata of an ONNX graph; a safetensors file is compared by its tensors and metadata, whose order
in the header the library does not keep from one run to the next. What still differs is listed: the reader decides whether it follows
from those (a sha256 of a file that holds them) or from timing (bench, report), or is a change of behaviour.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from safetensors.numpy import load

CODE_ONLY_KEYS = ("trtflow_code", "format", "build_seconds")


def without_code_keys(value):
    if isinstance(value, dict):
        return {key: without_code_keys(item) for key, item in value.items() if key not in CODE_ONLY_KEYS}
    if isinstance(value, list):
        return [without_code_keys(item) for item in value]
    return value


def without_software_metadata(data: bytes) -> bytes:
    model = onnx.load_from_string(data)
    kept = [prop for prop in model.metadata_props if prop.key != "trtflow.software"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    return model.SerializeToString()


def safetensors_content(data: bytes) -> tuple[dict, dict]:
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return header.get("__metadata__", {}), load(data)


def equal_but_for_code(path: Path, before: bytes, after: bytes) -> bool:
    if path.suffix == ".json":
        return without_code_keys(json.loads(before)) == without_code_keys(json.loads(after))
    if path.suffix == ".onnx":
        return without_software_metadata(before) == without_software_metadata(after)
    if path.suffix == ".safetensors":
        (old_metadata, old), (new_metadata, new) = safetensors_content(before), safetensors_content(after)
        return (
            old_metadata == new_metadata
            and old.keys() == new.keys()
            and all(np.array_equal(old[k], new[k]) for k in old)
        )
    return False


def main(before: Path, after: Path) -> int:
    files = {
        side: {path.relative_to(root / "results") for path in (root / "results").rglob("*") if path.is_file()}
        for side, root in (("before", before), ("after", after))
    }
    for side, other in (("before", "after"), ("after", "before")):
        for path in sorted(files[side] - files[other]):
            print(f"only {side}: {path}")
    identical, code_only, differing = 0, 0, []
    for path in sorted(files["before"] & files["after"]):
        old, new = (before / "results" / path).read_bytes(), (after / "results" / path).read_bytes()
        if old == new:
            identical += 1
        elif equal_but_for_code(path, old, new):
            code_only += 1
        else:
            differing.append(path)
    for path in differing:
        print(f"differs: {path}")
    print(
        f"{identical} identical, {code_only} equal but for the code hash, format key, build time or header order, {len(differing)} differ"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
