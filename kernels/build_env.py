"""Build-environment fixes shared by setup.py and the JIT loader (plain module: no torch import at load time)."""
import os
import re


def normalize_cuda_arch_list() -> str | None:
    """Rewrite TORCH_CUDA_ARCH_LIST entries like `9.0a` to `9.0` (DeepSpeed's and older builders reject them).

    Returns the normalized value (or None when unset)."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    entries = [e for e in re.split(r"[;\s,]+", value.strip()) if e]
    fixed = []
    for e in entries:
        ptx = e.endswith("+PTX")
        base = e[:-4] if ptx else e
        base = re.sub(r"^(\d+\.\d+)[a-z]$", r"\1", base)
        item = base + ("+PTX" if ptx else "")
        if item not in fixed:
            fixed.append(item)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(fixed)
    return os.environ["TORCH_CUDA_ARCH_LIST"]
