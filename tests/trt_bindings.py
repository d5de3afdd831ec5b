"""The real Python bindings of full TensorRT, one interpreter per version and CUDA flavour, without libnvinfer.

PyPI's `tensorrt-cu12-bindings` and `tensorrt-cu13-bindings` wheels are real: the pybind11 module
`tensorrt_bindings/tensorrt.so` and the pure-Python `tensorrt_bindings/plugin` package (from 10.6).
Only the `-libs` wheels (libnvinfer and friends) are download stubs. The binding module links against
nine C entry points of libnvinfer / libnvonnxparser / libnvinfer_plugin (createInferBuilder_INTERNAL,
getPluginRegistry, ...), the same sonames and symbols in cu12 and cu13. A *library shim*, compiled here
with `cc` at test time, gives those sonames and entry points, each returning 0 / NULL, so the bindings
import. The shim is not TensorRT: nothing is built or run with it; `trt.Builder(...)` or
`trt.get_plugin_registry()` return nothing.

The `tensorrt` package itself is the frontend of PyPI's `tensorrt-cu12` / `tensorrt-cu13` source
distribution: up to 10.13 only `from tensorrt_bindings import *`, from 10.14 also `tensorrt/plugin/`.
Both layouts are unpacked as PyPI ships them.

cu13 wheels exist from 10.13.2.6. At every cu13 version PyPI has (10.13.2.6 - 11.4.0.106, compared once
by hand), its `tensorrt_bindings` package is byte for byte the cu12 one and its frontend the same text:
the CUDA flavour lives only in the `-libs` wheels. The matrix runs cu13 where `VERSIONS` says so and
compares it with cu12 there. A `.postN` release differs from its base release only in `__version__`.

Every version runs under this venv's NumPy; the decorator-plugin versions also under NumPy < 2.4
(a wheel unpacked ahead of the venv on sys.path), the fix for their `int(<array>)` attribute bug.

Cache: `TRTFLOW_TRT_BINDINGS_CACHE`, default `.whl/trt-bindings` (git-ignored), one folder per CUDA
flavour and version (`cu12/10.0.1/`) with `site/` (what goes on sys.path) and a `ready` marker; wheels
download once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TRTFLOW_TRT_BINDINGS_CACHE", ROOT / ".whl" / "trt-bindings"))
PROBE = Path(__file__).with_name("trt_bindings_probe.py")

# The versions the matrix runs, per CUDA flavour of PyPI's wheels: the newest release of every minor
# version (10.7.0 and 10.13.3.9 stand for their .post1, which differ only in __version__), the first
# of each line we claim or refuse, and both PyPI layouts.
VERSIONS = {
    "cu12": (
        "10.0.1",  # first TensorRT 10; no tensorrt.plugin package at all
        "10.1.0",  # every minor release
        "10.2.0.post1",  # every minor release
        "10.3.0",  # every minor release
        "10.4.0",  # every minor release
        "10.5.0",  # every minor release
        "10.6.0.post2",  # every minor release; first bindings with a tensorrt_bindings.plugin package
        "10.7.0",  # last without INetworkDefinition.add_cumulative
        "10.8.0.43",  # the IPluginV3 flavour's only supported version
        "10.9.0.34",  # first ahead-of-time decorator plugin
        "10.10.0.31",  # every minor release
        "10.11.0.33",  # every minor release
        "10.12.0.36",  # every minor release
        "10.13.2.6",  # the first with a cu13 twin, compared with it byte for byte
        "10.13.3.9",  # last PyPI layout without tensorrt/plugin
        "10.14.1.48.post1",  # first PyPI layout with tensorrt/plugin
        "10.15.1.29",  # every minor release
        "10.16.1.11",  # newest 10.x
        "11.0.0.114",  # first 11.x: no implicit INT8
        "11.1.0.106",  # last tensorrt.plugin that converts attributes with int(array)
        "11.2.1.2",  # first that indexes [0]
        "11.3.0.99",  # every minor release
        "11.4.0.106",  # newest
    ),
    "cu13": (  # the same bindings as cu12 at every version (test_cu13_wheels_hold_the_cu12_bindings)
        "10.13.2.6",  # first tensorrt-cu13
        "11.4.0.106",  # newest
    ),
}
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
# Downloads wait mostly on the network; pip's own work is about a second each.
DOWNLOADS_AT_ONCE = 8


class Bindings(NamedTuple):
    """One PyPI release of TensorRT's Python bindings: `tensorrt-<cuda>-bindings==<version>` and its
    frontend `tensorrt-<cuda>==<version>`."""

    cuda: str  # PyPI's CUDA flavour: "cu12" or "cu13"
    version: str

    def __str__(self) -> str:
        return f"{self.version}-{self.cuda}"


BINDINGS = tuple(Bindings(cuda, version) for cuda, versions in VERSIONS.items() for version in versions)


class Unavailable(RuntimeError):
    """The bindings of a version are neither cached nor downloadable; the message says why."""


def _pip_download(requirements: list[str], dest: Path, *options: str) -> list[Path]:
    """The wheels and sdists of `requirements` (without their dependencies), downloaded into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    pip_download = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *options]
    # pip runs each sdist's setup.py for its metadata, by default in a fresh environment it installs setuptools
    # into; this venv's own setuptools, where it has one, saves that (cold matrix 70 s -> 27 s). Should an sdist
    # need more than that, the isolated build is the fallback.
    isolation = [["--no-build-isolation"], []] if importlib.util.find_spec("setuptools") else [[]]
    for flags in isolation:
        done = subprocess.run(
            [*pip_download, *flags, "--dest", str(dest), *requirements],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        files = [p for p in dest.iterdir() if p.name.endswith((".whl", ".tar.gz"))]
        if not done.returncode and len(files) == len(requirements):
            return files
    raise Unavailable(
        f"pip download {' '.join(requirements)} failed (PyPI unreachable and {dest} empty?): "
        f"{done.stderr.strip()[-400:]}"
    )


def _cached(folder: Path, fill) -> Path:
    """`folder`/site, filled once by `fill(site)`: built beside `folder` and renamed into place, so that a run
    killed half-way, or another test run sharing the cache, never finds a half-filled folder marked ready."""
    if (folder / "ready").is_file():
        return folder / "site"
    building = folder.with_name(f".{folder.name}.{os.getpid()}.{threading.get_ident()}")
    shutil.rmtree(building, ignore_errors=True)
    fill(building / "site")
    shutil.rmtree(building / "download", ignore_errors=True)
    (building / "ready").write_text(f"{folder.name}\n")
    if not (folder / "ready").is_file():  # an unfinished folder left by an older harness
        shutil.rmtree(folder, ignore_errors=True)
    try:
        building.rename(folder)
    except OSError:  # another run finished it first
        shutil.rmtree(building, ignore_errors=True)
    return folder / "site"


def site(bindings: Bindings) -> Path:
    """sys.path folder holding `tensorrt_bindings` (wheel) and `tensorrt` (frontend) of `bindings`."""
    requirements = [
        f"tensorrt-{bindings.cuda}-bindings=={bindings.version}",
        f"tensorrt-{bindings.cuda}=={bindings.version}",
    ]

    def fill(target: Path) -> None:
        downloads = _pip_download(requirements, target.parent / "download")
        wheels = [p for p in downloads if p.suffix == ".whl"]
        frontends = [p for p in downloads if p.name.endswith(".tar.gz")]
        if len(wheels) != 1 or len(frontends) != 1:
            raise Unavailable(f"{requirements}: expected a bindings wheel and a frontend sdist, got {downloads}")
        with zipfile.ZipFile(wheels[0]) as archive:
            archive.extractall(target)
        with tarfile.open(frontends[0]) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if len(parts) > 2 and parts[1] == "tensorrt" and member.isfile():
                    member.name = str(Path(*parts[1:]))
                    archive.extract(member, target, filter="data")

    return _cached(CACHE / bindings.cuda / bindings.version, fill)


def old_numpy() -> Path:
    """sys.path folder holding the newest NumPy < 2.4 wheel for this interpreter."""

    def fill(target: Path) -> None:
        (wheel,) = _pip_download([OLD_NUMPY], target.parent / "download", "--only-binary=:all:")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)

    return _cached(CACHE / "numpy-before-2.4", fill)


def shim() -> Path:
    """Folder with the library shim under each soname the bindings need (10 and 11; cu12 and cu13 alike)."""
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


def probe(bindings: Bindings, numpy_before_2_4: bool = False) -> dict:
    """Run tests/trt_bindings_probe.py in a fresh interpreter on `bindings`' real Python bindings; its JSON."""
    path = [str(old_numpy())] if numpy_before_2_4 else []
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(shim()),
        "PYTHONPATH": os.pathsep.join([*path, str(site(bindings)), str(ROOT / "src")]),
    }
    done = subprocess.run(
        [sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode:
        raise RuntimeError(f"the probe of TensorRT {bindings} bindings failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe_all(runs) -> dict[tuple[Bindings, bool], dict]:
    """Each (bindings, numpy_before_2_4) run's probe, two at a time, after every download they need."""
    shim()
    with ThreadPoolExecutor(max_workers=DOWNLOADS_AT_ONCE) as pool:
        downloads = [pool.submit(site, bindings) for bindings in dict.fromkeys(b for b, _ in runs)]
        if any(before_2_4 for _, before_2_4 in runs):
            downloads.append(pool.submit(old_numpy))
        for download in downloads:
            download.result()  # raises the first Unavailable
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(runs, pool.map(lambda run: probe(*run), runs)))
