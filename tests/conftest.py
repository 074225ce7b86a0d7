import os
import platform
import tempfile

# One set of CPU kernels on every x86 machine. PyTorch, oneDNN (convolutions) and MKL (matrix products)
# each pick AVX-512 code where the CPU has it and AVX2 elsewhere, and the two sum in other orders, so
# the stored references (tests/references) would move from one CI machine to the next. Every x86 CPU CI
# runs on has AVX2. Read by the libraries at their first kernel, so set before anything runs one.
if platform.machine().lower() in ("x86_64", "amd64"):
    # MKL also picks code paths by CPU vendor, not only by instruction set: on an Intel Xeon the
    # entropy calibrator's scales moved 9-14% from the AMD-stored ones until MKL_CBWR pinned them.
    for var, isa in (
        ("ATEN_CPU_CAPABILITY", "avx2"),
        ("ONEDNN_MAX_CPU_ISA", "AVX2"),
        ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
        ("MKL_CBWR", "COMPATIBLE"),
    ):
        os.environ.setdefault(var, isa)

import pytest  # noqa: E402
import torch  # noqa: E402

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
