"""The real Python bindings of full TensorRT, one interpreter per version, without TensorRT's native library.

PyPI's `tensorrt-cu12-bindings` wheels are real: the pybind11 module `tensorrt_bindings/tensorrt.so`
and the pure-Python `tensorrt_bindings/plugin` package. Only the `-libs` wheels (libnvinfer and
friends) are download stubs. The binding module links against nine C entry points of
libnvinfer / libnvonnxparser / libnvinfer_plugin (createInferBuilder_INTERNAL, getPluginRegistry,
...). A *library shim*, compiled here with `cc` at test time, gives those sonames and entry points,
each returning 0 / NULL, so the bindings import. The shim is not TensorRT: nothing is built or run
with it; `trt.Builder(...)` or `trt.get_plugin_registry()` return nothing.

The `tensorrt` package itself is the frontend of PyPI's `tensorrt-cu12` source distribution: up to
10.13 only `from tensorrt_bindings import *`, from 10.14 also `tensorrt/plugin/__init__.py`. Both
layouts are unpacked as PyPI ships them.

Every version runs under this venv's NumPy; the decorator-plugin versions also under NumPy < 2.4
(a wheel unpacked ahead of the venv on sys.path), the fix for their `int(<array>)` attribute bug.

Cache: `TRTFLOW_TRT_BINDINGS_CACHE`, default `.whl/trt-bindings` (git-ignored), one folder per version
with `site/` (what goes on sys.path) and a `ready` marker; wheels download once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TRTFLOW_TRT_BINDINGS_CACHE", ROOT / ".whl" / "trt-bindings"))
PROBE = Path(__file__).with_name("trt_bindings_probe.py")

# The versions the matrix runs: the first of each line we claim or refuse, and both PyPI layouts.
VERSIONS = (
    "10.0.1",  # first TensorRT 10; no tensorrt.plugin package at all
    "10.7.0",  # last without INetworkDefinition.add_cumulative
    "10.8.0.43",  # the IPluginV3 flavour's only supported version
    "10.9.0.34",  # first ahead-of-time decorator plugin
    "10.13.3.9",  # last PyPI layout without tensorrt/plugin
    "10.14.1.48.post1",  # first PyPI layout with tensorrt/plugin
    "10.16.1.11",  # newest 10.x
    "11.0.0.114",  # first 11.x: no implicit INT8
    "11.1.0.106",  # last tensorrt.plugin that converts attributes with int(array)
    "11.2.1.2",  # first that indexes [0]
    "11.4.0.106",  # newest
)
SHIM_SYMBOLS = {
    "createInferBuilder_INTERNAL": "void *",
    "createInferRefitter_INTERNAL": "void *",
    "createInferRuntime_INTERNAL": "void *",
    "createNvOnnxParser_INTERNAL": "void *",
    "createNvOnnxParserRefitter_INTERNAL": "void *",
    "getBuilderPluginRegistry": "void *",
    "getPluginRegistry": "void *",
    "getNvOnnxParserVersion": "int",
    "initLibNvInferPlugins": "int",
}
SONAMES = ("libnvinfer.so", "libnvonnxparser.so", "libnvinfer_plugin.so")
OLD_NUMPY = "numpy<2.4"


class Unavailable(RuntimeError):
    """The bindings of a version are neither cached nor downloadable; the message says why."""


def _pip_download(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), requirement],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    files = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz")]
    if done.returncode or not files:
        raise Unavailable(
            f"pip download {requirement} failed (PyPI unreachable and {dest} empty?): {done.stderr.strip()[-400:]}"
        )
    return files[0]


def site(version: str) -> Path:
    """sys.path folder holding `tensorrt_bindings` (wheel) and `tensorrt` (frontend) of `version`."""
    folder = CACHE / version
    if (folder / "ready").is_file():
        return folder / "site"
    shutil.rmtree(folder, ignore_errors=True)
    target = folder / "site"
    wheel = _pip_download(f"tensorrt-cu12-bindings=={version}", folder / "download" / "bindings")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    frontend = _pip_download(f"tensorrt-cu12=={version}", folder / "download" / "frontend")
    with tarfile.open(frontend) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) > 2 and parts[1] == "tensorrt" and member.isfile():
                member.name = str(Path(*parts[1:]))
                archive.extract(member, target, filter="data")
    shutil.rmtree(folder / "download")
    (folder / "ready").write_text(version + "\n")
    return target


def old_numpy() -> Path:
    """sys.path folder holding the newest NumPy < 2.4 wheel for this interpreter."""
    folder = CACHE / "numpy-before-2.4"
    if not (folder / "ready").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        with zipfile.ZipFile(_pip_download(OLD_NUMPY, folder / "download")) as archive:
            archive.extractall(folder / "site")
        shutil.rmtree(folder / "download")
        (folder / "ready").write_text(OLD_NUMPY + "\n")
    return folder / "site"


def shim() -> Path:
    """Folder with the library shim under each soname the bindings need (10 and 11)."""
    folder = CACHE / "shim"
    source = "".join(f"{kind} {name}(void) {{ return 0; }}\n" for name, kind in SHIM_SYMBOLS.items())
    if (folder / "shim.c").is_file() and (folder / "shim.c").read_text() == source:
        return folder
    if shutil.which("cc") is None:
        raise Unavailable("no C compiler (cc) to build the library shim")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shim.c").write_text(source)
    for major in (10, 11):
        for soname in SONAMES:
            subprocess.run(
                [
                    "cc",
                    "-shared",
                    "-fPIC",
                    "-o",
                    str(folder / f"{soname}.{major}"),
                    f"-Wl,-soname,{soname}.{major}",
                    str(folder / "shim.c"),
                ],
                check=True,
            )
    return folder


def probe(version: str, numpy_before_2_4: bool = False) -> dict:
    """Run tests/trt_bindings_probe.py in a fresh interpreter on `version`'s real bindings; its JSON."""
    path = [str(old_numpy())] if numpy_before_2_4 else []
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(shim()),
        "PYTHONPATH": os.pathsep.join([*path, str(site(version)), str(ROOT / "src")]),
    }
    done = subprocess.run(
        [sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode:
        raise RuntimeError(f"the probe of TensorRT {version} bindings failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe_all(runs) -> dict[tuple[str, bool], dict]:
    """Each (version, numpy_before_2_4) run's probe, two at a time (downloads first, one after another)."""
    shim()
    for version, before_2_4 in runs:
        site(version)
        if before_2_4:
            old_numpy()
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(runs, pool.map(lambda run: probe(*run), runs)))
