"""The source distribution: it must hold every file the extension's build needs."""

import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sdist_holds_every_source_and_header(tmp_path):
    """setuptools puts the ext_modules' .cpp files in the sdist, but no header, and cuda/*.cu only
    when the sdist is made with a CUDA torch: MANIFEST.in adds them. The sdist is made (CPU-only,
    ~5 s, no compiling) from a copy of the tracked files, so setup.py's _build_config.py and
    egg-info never touch this checkout."""
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")) and \
            not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split("\0")
    tracked = [f for f in tracked if f and os.path.isfile(os.path.join(ROOT, f))]
    src = tmp_path / "src"
    for f in tracked:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    env = dict(os.environ, QLIB_USE_CUDA="0")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--formats=gztar", "-d", str(tmp_path / "dist")],
                   cwd=src, env=env, check=True, capture_output=True, timeout=300)
    (archive,) = (tmp_path / "dist").iterdir()
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"{archive.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    # A wheel runs only with the torch it was compiled against: its metadata pins it.
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}\n" in pkg_info
    needed = [f for f in tracked if f.startswith(("csrc/", "cuda/", "tests/cpp/"))]
    needed += ["CMakeLists.txt", "setup.py", "pyproject.toml", "tests/conftest.py"]
    assert any(f.endswith(".h") for f in needed) and any(f.endswith(".cu") for f in needed)
    missing = sorted(set(needed) - names)
    assert not missing, f"the sdist lacks {missing}"
