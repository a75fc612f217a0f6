"""Shared fixtures: models are built once per test session."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter. The switch must be set
# before any @triton.jit decorator runs, so here, before any test imports kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.model_fixtures import make_tiny_model, smollm2_path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir):
    """tiny_model(family) -> checkpoint dir; families: tests/model_fixtures.TINY_FAMILIES."""
    return lambda family: make_tiny_model(family, model_dir)


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_path()
