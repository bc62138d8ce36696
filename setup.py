"""Install dualloop; `kernels/` installs as `dualloop.kernels` (never as a top-level `kernels`).

The CUDA extension of the mask loss is built here only when a CUDA-enabled torch is importable
(DUALLOOP_BUILD_CUDA=1 forces, =0 skips). Otherwise it JIT-builds on first use (see kernels/cuda_ext.py).
"""
import os

from setuptools import find_packages, setup

PACKAGES = [p for p in find_packages(include=["dualloop", "dualloop.*"])] + ["dualloop.kernels"]
PACKAGE_DIR = {"dualloop.kernels": "kernels"}


def _cuda_extension():
    flag = os.environ.get("DUALLOOP_BUILD_CUDA", "auto")
    if flag == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag == "1":
            raise RuntimeError("DUALLOOP_BUILD_CUDA=1 but torch is not importable in the build environment; "
                               "install with `pip install --no-build-isolation -e .`") from None
        return [], {}
    if flag != "1" and not (torch.version.cuda and CUDA_HOME):
        return [], {}
    # Load the helper by path: importing the `kernels` folder as a package would pull in triton at build time.
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dl_build_env", os.path.join("kernels", "build_env.py"))
    build_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_env)
    build_env.normalize_cuda_arch_list()
    ext = CUDAExtension(
        name="dualloop.kernels._mask_loss_cuda",
        sources=["kernels/csrc/mask_loss.cpp", "kernels/csrc/mask_loss_cuda.cu"],
        include_dirs=[os.path.abspath(os.path.join("kernels", "csrc"))],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )

    class OptionalCudaBuild(BuildExtension):
        """Unless forced (=1), a failed extension build keeps the install working: backend='cuda' then JIT-builds
        on first use and reports the compiler's error if that fails too."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # any compiler/toolchain failure
                if flag == "1":
                    raise
                print(f"WARNING: building dualloop.kernels._mask_loss_cuda failed ({e}); "
                      "backend='cuda' will try a JIT build on first use", flush=True)
                self.extensions = []

    return [ext], {"build_ext": OptionalCudaBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="dualloop",
    version="0.1.0",
    description="Dual-loop (caption -> ground) fine-tuning of Sa2VA-style segmentation VLMs on DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"dualloop.kernels": ["csrc/*.cpp", "csrc/*.cu", "csrc/*.h"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.11",
        "numpy>=1.24",
        "triton>=3.6; platform_system=='Linux'",
        "transformers>=5.17",
        "peft>=0.17",
        "deepspeed>=0.19.3",
        "pycocotools>=2.0.8",
        "av>=12",
        "opencv-python-headless>=4.8",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "psutil>=5.9",
    ],
    extras_require={"dev": ["pytest>=8", "ruff>=0.5", "ninja>=1.11"]},
    entry_points={"console_scripts": ["dualloop=dualloop.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
