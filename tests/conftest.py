"""Shared pytest setup: the ``cuda`` marker and the tiny offline FLUX pipelines."""

import os
import sys

import pytest
import torch

# The scripts under test (single_file_inference.py, ...) live at the repo root, not in a package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tiny_pipeline import make_tiny_pipeline  # noqa: E402  (needs the sys.path entry above)


def pytest_collection_modifyitems(config, items):
    # CI and developer machines have no GPU; the cuda tests run on the lent device machine.
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random-weight FLUX.1-dev-like pipeline (with guidance embedding), built once."""
    return make_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_flux_dev")), guidance_embeds=True)


@pytest.fixture(scope="session")
def tiny_pipeline_dir_schnell(tmp_path_factory):
    """A tiny random-weight FLUX.1-schnell-like pipeline (no guidance embedding), built once."""
    return make_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_flux_schnell")), guidance_embeds=False)
