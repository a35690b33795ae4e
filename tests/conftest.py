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


def kernel_family_fixture(names, set_kernel):
    """A fixture running its test under each kernel family in `names` (set_kernel(name)),
    then back to "auto": for the int8 and 4-bit CPU kernel families."""

    @pytest.fixture(params=names)
    def kernel(request):
        set_kernel(request.param)
        try:
            yield request.param
        finally:
            set_kernel("auto")

    return kernel
