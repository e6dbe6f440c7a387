"""Build tools the kernels need at run time, checked before the first kernel runs so that a missing one is a
one-line error naming the fix instead of a traceback from inside Triton or inductor.

- On CUDA, Triton builds a small C launcher for every kernel signature the first time it runs: it needs a C
  compiler (`CC`, else gcc or clang), whatever the execution mode.
- On the CPU, `torch.compile` (inductor) writes C++ kernels: it needs a C++ compiler (`CXX`, else g++, c++ or
  clang++).
"""
import os
import shutil

import torch


def _first_on_path(variable: str, names: tuple[str, ...]) -> str | None:
    """The compiler that `variable` names (when set), else the first of `names` on PATH."""
    candidates = [os.environ[variable]] if os.environ.get(variable) else list(names)
    return next((path for path in map(shutil.which, candidates) if path), None)


def c_compiler() -> str | None:
    """The C compiler Triton would build its CUDA launchers with."""
    return _first_on_path("CC", ("gcc", "clang", "cc"))


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with."""
    return _first_on_path("CXX", ("g++", "c++", "clang++"))


def check_toolchain(device: torch.device, execution: str) -> None:
    """Raise a RuntimeError saying what to install when running on `device` in `execution` mode cannot work."""
    if device.type == "cuda" and not c_compiler():
        raise RuntimeError("Triton kernels on CUDA need a C compiler to build their launchers (gcc or clang): "
                           "install one (e.g. apt-get install gcc) or point CC at it")
    if execution == "compiled" and device.type == "cpu" and not cpp_compiler():
        raise RuntimeError("compiling on the CPU needs a C++ compiler for torch.compile (g++ or clang++); "
                           "install one or run without compiling")
