"""llama.cpp's own `llama-server`, built from the llama.cpp source vendored in the installed
llama-cpp-python (same version, same kernels as our engine), once, and cached under bench/.cache.

    .venv/bin/python bench/llama_server.py     # build (or find) it and print its path
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"


def _sdist(version: str, into: Path) -> Path:
    """The llama-cpp-python source distribution of ``version`` (from the package index)."""
    found = sorted(into.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"),
            *("-d", str(into), f"llama-cpp-python=={version}"),
        ],
        check=True,
    )
    return next(into.glob(f"llama_cpp_python-{version}.tar.gz"))


def llama_server() -> Path:
    """The path of a llama-server binary built from the installed llama-cpp-python's llama.cpp."""
    version = importlib.metadata.version("llama-cpp-python")
    home = CACHE / f"llama-server-{version}"
    binary = home / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    archive = _sdist(version, CACHE)
    source = home / "src"
    if not source.exists():
        with tarfile.open(archive) as tar, tempfile.TemporaryDirectory(dir=home) as unpacked:
            tar.extractall(unpacked, filter="data")
            (Path(unpacked) / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp").rename(source)
    build = home / "build"
    # The flags our engine's wheel was built with (scripts/setup.sh): portable CPU kernels.
    flags = ["-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *flags], check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True)
    return binary


def start_llama_server(
    model: Path, port: int, *, threads: int, context: int, slots: int, log: Path
) -> subprocess.Popen[bytes]:
    """llama-server on loopback with ``slots`` parallel slots sharing ``context`` cells; waits until ready."""
    command = [
        str(llama_server()),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-c",
        str(context),
        "-np",
        str(slots),
    ]
    process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"llama-server not ready within 120 s; see {log}")


if __name__ == "__main__":
    print(llama_server())
