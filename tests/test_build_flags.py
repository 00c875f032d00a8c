"""setup.py's tuning flags are probed, not assumed: a compiler that rejects one (GCC on aarch64 has no
-mprefer-vector-width; older Apple clang no -march=native) builds without it instead of failing, and
a compiler that accepts them (CI's x86 GCC) keeps every one (a broken probe would silently drop the
vector width the CPU kernels were tuned for)."""
import importlib.util
import os
import platform
import shutil
import stat

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or "c++"
needs_compiler = pytest.mark.skipif(shutil.which(CXX.split()[0]) is None, reason=f"no C++ compiler ({CXX})")


def load_setup():
    spec = importlib.util.spec_from_file_location("snnkd_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


@needs_compiler
def test_unknown_flag_is_dropped_and_known_kept(capsys):
    flags = load_setup().supported_compiler_flags(["-O3", "-mno-such-option-snnkd", "-ffp-contract=off"])
    assert flags == ["-O3", "-ffp-contract=off"]
    assert "does not accept -mno-such-option-snnkd" in capsys.readouterr().err


@needs_compiler
def test_compiler_rejecting_the_vector_width_builds_without_it(tmp_path):
    """A stand-in for aarch64 GCC: the real compiler behind a wrapper that rejects -mprefer-vector-width."""
    wrapper = tmp_path / "cxx-without-prefer-vector-width"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -mprefer-vector-width=*)\n'
                       '  echo "unrecognized command-line option $a" >&2; exit 1;; esac; done\n'
                       f'exec {CXX} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    flags = load_setup().supported_compiler_flags(["-march=native", "-mprefer-vector-width=512"],
                                                  compiler=[str(wrapper)])
    assert flags == ["-march=native"]


def test_missing_compiler_accepts_nothing():
    assert load_setup().supported_compiler_flags(["-O3"], compiler=["/nonexistent/snnkd-cxx"]) == []


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 tuning flags")
def test_x86_compiler_keeps_the_tuning_flags():
    flags = ["-march=native", "-mprefer-vector-width=512"]
    assert load_setup().supported_compiler_flags(flags) == flags


def test_sdist_carries_every_source_and_header(tmp_path):
    """An sdist (pip's route from a source archive) must build: setup.py names only the .cpp/.cu files
    it compiles, so the headers they include come from MANIFEST.in."""
    import glob
    import subprocess
    import sys
    import tarfile

    # A fresh egg-info: setuptools would otherwise add the files of an existing SOURCES.txt (the last
    # build's list) to the sdist, and a missing MANIFEST.in line would go unnoticed here.
    egg_base = tmp_path / "egg"
    egg_base.mkdir()
    result = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg_base),
                             "sdist", "--formats=gztar", "--dist-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = glob.glob(str(tmp_path / "*.tar.gz"))
    with tarfile.open(archive) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {os.path.relpath(path, ROOT) for pattern in ("*.h", "*.cuh", "*.cpp", "*.cu")
               for path in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True)}
    assert sources and not sources - members, sorted(sources - members)
    assert {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "snnkd_fast/__init__.py"} <= members
