"""Test-session environment: set before anything imports triton or deepspeed.

Without CUDA, Triton kernels run in the CPU interpreter (TRITON_INTERPRET must be set before triton is
imported) and DeepSpeed uses its CPU accelerator with gloo.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DUALLOOP_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "dualloop-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA; runs in `make gpu-check`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def model():
    """The tiny preset in train mode, one per test module (test_loop_step, test_loop_math); modules that need another
    model define their own `model` fixture, which takes precedence."""
    from dualloop.config import ModelConfig
    from dualloop.model import build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="tiny"))
    m.train()
    return m


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The `data` section of a synthetic corpus in the four real layouts (one per test module); modules whose
    readers need other data define their own `corpus`."""
    import yaml

    from dualloop.data import write_synthetic_corpus

    paths = write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=0)
    return yaml.safe_load(open(paths["config"]))["data"]
