"""Build the optional native backend ``opensloth._native`` (C++17, pybind11).

A failed native build leaves a working install (the numba and python backends serve) unless
OPENSLOTH_REQUIRE_NATIVE=1, which CI sets. OPENSLOTH_SANITIZE=1 builds with AddressSanitizer and
UndefinedBehaviorSanitizer for the sanitised test run (see scripts/sanitized_native_tests.sh).
"""

import os
import re
import sys
from glob import glob
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "opensloth" / "__init__.py").read_text()).group(1)
REQUIRE_NATIVE = os.environ.get("OPENSLOTH_REQUIRE_NATIVE", "0") == "1"
SANITIZE = os.environ.get("OPENSLOTH_SANITIZE", "0") == "1"


class OptionalBuildExt(build_ext):
    """build_ext that reports a failed native build instead of failing the install (unless required)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure
            self._give_up(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._give_up(exc)

    def _give_up(self, exc):
        if REQUIRE_NATIVE:
            raise exc
        sys.stderr.write(
            f"\nopensloth: the native backend was not built ({exc}).\n"
            "opensloth: the numba / python backends will be used. "
            "Set OPENSLOTH_REQUIRE_NATIVE=1 to make this an error.\n\n"
        )


def native_extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError as exc:
        if REQUIRE_NATIVE:
            raise
        sys.stderr.write(f"opensloth: pybind11 is missing ({exc}); skipping the native backend\n")
        return []
    sources = sorted(str(Path(p).as_posix()) for p in glob("csrc/*.cpp"))
    if not sources:
        return []
    headers = sorted(str(Path(p).as_posix()) for p in glob("csrc/*.hpp"))
    compile_args = ["/O2"] if sys.platform == "win32" else ["-O3"]
    link_args = []
    if SANITIZE:
        flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        compile_args = ["-O1"] + flags
        link_args = flags
    return [
        Pybind11Extension(
            "opensloth._native",
            sources,
            include_dirs=["csrc"],
            depends=headers,
            cxx_std=17,
            define_macros=[("OPENSLOTH_VERSION", f'"{VERSION}"')],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ]


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
