"""Loads the compiled extension qlib._C, or fails loudly saying how to build it."""
import glob
import os

import torch

_HOW_TO_BUILD = (
    "Build it from the repository root with:\n"
    "    pip install --no-build-isolation -e .\n"
    "(or run `bash scripts/test.sh`, which also creates .venv/)."
)

try:
    from . import _build_config
except ImportError as e:
    raise ImportError(f"qlib is not built: python/qlib/_build_config.py is missing. {_HOW_TO_BUILD}") from e

if _build_config.CPU_ISA == "avx2":
    _have = torch.backends.cpu.get_cpu_capability()
    if _have not in ("AVX2", "AVX512", "AVX512_BF16", "AVX512_VNNI", "AMX"):
        raise ImportError(
            f"qlib was compiled for AVX2 but this CPU reports {_have}. "
            f"Rebuild with QLIB_CPU_ISA=default. {_HOW_TO_BUILD}"
        )

try:
    from . import _C  # noqa: F401  (registers torch.ops.qlib.*)
except ImportError as e:
    _here = os.path.dirname(os.path.abspath(__file__))
    if not glob.glob(os.path.join(_here, "_C*.so")) and not glob.glob(os.path.join(_here, "_C*.pyd")):
        raise ImportError(f"qlib's compiled extension is not built: no {_here}/_C*.so. {_HOW_TO_BUILD}") from e
    _built = getattr(_build_config, "TORCH_VERSION", None)
    if _built is not None and _built != torch.__version__:
        raise ImportError(
            f"qlib's compiled extension qlib._C failed to load ({e}): it was built against torch {_built}, "
            f"but torch {torch.__version__} is imported. Rebuild qlib against this torch (or install torch "
            f"{_built}). {_HOW_TO_BUILD}"
        ) from e
    raise ImportError(f"qlib's compiled extension qlib._C failed to load ({e}). {_HOW_TO_BUILD}") from e
