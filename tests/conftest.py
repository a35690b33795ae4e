import pytest
import torch

import qlib  # noqa: F401  (registers torch.ops.qlib)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    # Every test that takes `device` runs on each device present; absent
    # devices are not collected (never failed).
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
