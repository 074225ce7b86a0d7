import os
import tempfile

import pytest
import torch

# keep the zoo's trained checkpoints in one place for the whole run (CI starts empty)
os.environ.setdefault("SLIMKIT_CACHE", os.path.join(tempfile.gettempdir(), "slimkit-test-cache"))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    from slimkit.data import load_digits32

    return load_digits32()


@pytest.fixture(scope="session")
def trained_mlp():
    from slimkit.zoo import trained

    return trained("mlp")


@pytest.fixture(scope="session")
def trained_resnet():
    from slimkit.zoo import trained

    return trained("resnet18")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
