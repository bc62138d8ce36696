"""The CUDA extension's sources compile on this (GPU-less) machine: the .cu with nvcc, the torch binding (.cpp)
with the host C++ compiler against torch's headers. They are linked and run on a GPU in `make gpu-check`."""
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_ext

CSRC = os.path.join(os.path.dirname(__file__), "..", "kernels", "csrc")


def _cuda_home():
    home = cpp_ext.CUDA_HOME or "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")) else None


def _nvcc():
    home = _cuda_home()
    cand = os.path.join(home, "bin", "nvcc") if home else None
    return cand if cand and os.path.exists(cand) else shutil.which("nvcc")


def _compile_jobs(tmp_path):
    """(name, argv) of each compile that this machine can run; skip reasons for the others."""
    jobs, skipped = [], []
    nvcc = _nvcc()
    if nvcc:
        jobs.append(("mask_loss_cuda.cu", [nvcc, "-c", "-std=c++20", "-O2", "--use_fast_math", "-arch=sm_90",
                                           "-Werror", "all-warnings", os.path.join(CSRC, "mask_loss_cuda.cu"),
                                           "-o", str(tmp_path / "cu.o")]))
    else:
        skipped.append("nvcc not found")
    cxx = shutil.which("c++") or shutil.which("g++")
    home = _cuda_home()
    if cxx and home:
        includes = cpp_ext.include_paths() + [sysconfig.get_paths()["include"], os.path.join(home, "include"), CSRC]
        # CPU builds of torch ship c10/cuda headers without the generated cuda_cmake_macros.h: supply it.
        shim = tmp_path / "shim"
        macros = "c10/cuda/impl/cuda_cmake_macros.h"
        if not any(os.path.exists(os.path.join(p, macros)) for p in includes):
            (shim / "c10/cuda/impl").mkdir(parents=True)
            (shim / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            includes.append(str(shim))
        jobs.append(("mask_loss.cpp", [cxx, "-fsyntax-only", "-std=c++20", "-fPIC", "-w",
                                       "-DTORCH_EXTENSION_NAME=_mask_loss_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H"]
                     + [f"-I{p}" for p in includes] + [os.path.join(CSRC, "mask_loss.cpp")]))
    else:
        skipped.append("no C++ compiler or CUDA headers for the torch binding")
    return jobs, skipped


def test_cuda_sources_compile(tmp_path):
    jobs, skipped = _compile_jobs(tmp_path)
    if not jobs:
        pytest.skip("; ".join(skipped))
    procs = [(name, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for name, argv in jobs]  # in parallel: the torch headers dominate
    failures = []
    for name, proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"{name}:\n{out[-4000:]}")
    assert not failures, "\n\n".join(failures)
    if skipped:
        pytest.skip("compiled " + ", ".join(n for n, _ in jobs) + "; not checked: " + "; ".join(skipped))
