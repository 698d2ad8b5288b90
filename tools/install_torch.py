"""Install the PyTorch build this machine can use, before `pip install -e .` (called by the Makefile).

    python tools/install_torch.py [--torch auto|cpu|cuda]     (TORCH=... in the environment works too)

Why: on Linux x86_64 PyPI's `torch` is the CUDA build. On a machine without an NVIDIA GPU
`make run` pulled it with 18 nvidia wheels and triton, about 2.95 GB of downloads and a 5.9 GB
.venv (issue 9), for kernels that machine can never run. PyTorch's own CPU index has the same
torch at ~0.2 GB.

- auto (the default): cuda where an NVIDIA GPU driver is present (`nvidia-smi` on the PATH or
  /proc/driver/nvidia), else cpu.
- cpu: torch from https://download.pytorch.org/whl/cpu; where that index cannot be reached, a CPU
  build (`+cpu`) that the default index (pip's configuration, find-links included) offers, else
  the default index's torch, with a note saying so.
- cuda: torch from the default index (PyPI's Linux wheels are CUDA builds).

A torch that already fits is kept and nothing is installed: any torch >= 2.4 for auto on a machine
without a GPU, a CUDA build for cuda, a CPU build for an explicit cpu. CI pre-installs its CPU
wheel, so `make test` there installs no torch at all. Standard library only: it runs before torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REQUIREMENT = "torch>=2.4"  # as in pyproject.toml
MIN_VERSION = (2, 4)


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia")


def installed_torch(python: str) -> tuple[str, bool] | None:
    """(version, is a CUDA build) of the torch `python` imports, or None."""
    code = "import torch; print(torch.__version__); print(torch.version.cuda is not None)"
    run = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if run.returncode != 0:
        return None
    version, cuda = run.stdout.split()[-2:]
    return version, cuda == "True"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def fits(found: tuple[str, bool] | None, flavour: str, explicit: bool) -> bool:
    """Whether the installed torch serves `flavour` ("cpu" or "cuda"); `explicit`: asked by TORCH=."""
    if found is None:
        return False
    version, cuda = found
    if _version_tuple(version) < MIN_VERSION:
        return False
    if flavour == "cuda":
        return cuda
    return not cuda if explicit else True  # a CUDA build also runs on the CPU: keep it unless asked not to


def reachable(url: str, timeout: float = 8.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/torch/", timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def cpu_builds(versions: list[str]) -> list[str]:
    """The CPU builds (`+cpu`) of torch >= 2.4 among `versions`, newest first."""
    cpu = [v for v in versions if v.endswith("+cpu") and _version_tuple(v) >= MIN_VERSION]
    return sorted(cpu, key=lambda v: tuple(int(p) if p.isdigit() else 0 for p in v.split("+")[0].split(".")),
                  reverse=True)


def index_versions(python: str) -> list[str]:
    """torch versions the default index (pip's configuration, find-links included) offers; [] if unknown."""
    run = subprocess.run([python, "-m", "pip", "index", "versions", "torch"], capture_output=True, text=True)
    for line in run.stdout.splitlines():
        if line.startswith("Available versions:"):
            return [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
    return []


def pip(python: str, *args: str) -> bool:
    print("  pip " + " ".join(args))
    return subprocess.run([python, "-m", "pip", *args[:1], "-q", *args[1:]]).returncode == 0


def install(flavour: str, found: tuple[str, bool] | None, python: str, cpu_index: str) -> bool:
    if found is not None and not pip(python, "uninstall", "-y", "torch"):  # pip would keep it: it satisfies >=2.4
        return False
    if flavour == "cuda":
        print("torch: installing the CUDA build from the default index")
        return pip(python, "install", REQUIREMENT)
    if reachable(cpu_index):
        print(f"torch: installing the CPU build from {cpu_index}")
        if pip(python, "install", "--index-url", cpu_index, REQUIREMENT):
            return True
        print(f"torch: {cpu_index} failed")
    else:
        print(f"torch: {cpu_index} cannot be reached")
    for version in cpu_builds(index_versions(python)):  # a CPU build the default index has (a local wheel)
        print(f"torch: installing the CPU build {version} from the default index")
        if pip(python, "install", f"torch=={version}"):
            return True
    print("torch: no CPU build on the default index; installing its torch (on Linux x86_64 PyPI's torch is the "
          "CUDA build, about 3 GB with its nvidia wheels)")
    return pip(python, "install", REQUIREMENT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", choices=("auto", "cpu", "cuda"), default=os.environ.get("TORCH") or "auto",
                        help="which build (default: $TORCH, else auto)")
    parser.add_argument("--cpu-index", default=os.environ.get("TORCH_CPU_INDEX") or CPU_INDEX)
    parser.add_argument("--python", default=sys.executable, help="the environment to install into")
    args = parser.parse_args(argv)
    explicit = args.torch != "auto"
    flavour = args.torch if explicit else ("cuda" if has_nvidia_gpu() else "cpu")
    why = f"TORCH={args.torch}" if explicit else f"auto, {'an' if flavour == 'cuda' else 'no'} NVIDIA GPU"
    found = installed_torch(args.python)
    if fits(found, flavour, explicit):
        print(f"torch ({why}): {found[0]} ({'CUDA' if found[1] else 'CPU'} build) is installed and fits: "
              "installing no torch")
        return 0
    print(f"torch ({why}): want the {flavour.upper()} build" + (f", found {found[0]}" if found else ""))
    if not install(flavour, found, args.python, args.cpu_index):
        return 1
    now = installed_torch(args.python)
    if now is None:
        print("torch: the installed torch does not import")
        return 1
    print(f"torch: {now[0]} ({'CUDA' if now[1] else 'CPU'} build) installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
