"""The fused CPU kernels (``jbn/kernels/norm.cc``): compiled with the machine's C++ compiler on first use, cached.

The library is built once per source, jaxlib, compiler and CPU into ``$JBN_CACHE_DIR`` (by default
``~/.cache/jbn``), written to a temporary name and renamed, so processes starting together do not clash. Where
no compiler is found or the build fails, a warning says why and jbn uses its XLA path, which gives the same
results more slowly. ``JBN_KERNELS=0`` turns the kernels off.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jaxlib

SOURCE = pathlib.Path(__file__).with_name("kernels") / "norm.cc"
TARGETS = {
    "jbn_norm_forward": "JbnNormForward",
    "jbn_norm_backward": "JbnNormBackward",
    "jbn_norm_statistics": "JbnNormStatistics",
    "jbn_norm_affine": "JbnNormAffine",
}
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")


_LOCK = threading.Lock()  # one build per process, whichever thread traces first


def enabled() -> bool:
    """Whether the fused CPU kernels are built and registered (building them on the first call)."""
    if os.environ.get("JBN_KERNELS", "1") == "0":
        return False
    with _LOCK:
        return _register()


@functools.cache
def _register() -> bool:
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        warnings.warn(
            f"jbn: the fused CPU kernels are not available ({error}); using the XLA path, which gives the same "
            "results more slowly. Set JBN_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def _build() -> pathlib.Path:
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE)]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    key = "\n".join([SOURCE.read_text(), jaxlib.__version__, version, *command, platform.machine(), _cpu_flags()])
    directory = pathlib.Path(os.environ.get("JBN_CACHE_DIR") or pathlib.Path.home() / ".cache" / "jbn")
    library = directory / f"norm-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = pathlib.Path(scratch) / library.name
        result = subprocess.run([*command, "-o", str(built)], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, library)
    return library


def _cpu_flags() -> str:
    """The CPU's feature flags: ``-march=native`` code must not be reused on a different CPU."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
