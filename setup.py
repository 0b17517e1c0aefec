"""Builds the optional compiled CPU kernel ``metanorm._C``; everything else is in pyproject.toml.

The kernel needs PyTorch's headers at build time, so it is built only when torch is importable
by the build (``pip install --no-build-isolation``, as ``make`` does). Without it the package
still works: :mod:`metanorm.glm` falls back to plain PyTorch operations (same results, slower on
the CPU). Environment variables:

- ``METANORM_BUILD_EXT=0``: do not build the kernel; ``=1``: fail if it cannot be built.
- ``METANORM_CPU_ARCH``: the ``-march`` value (default ``native`` on x86-64: the kernel is
  compiled for the machine that builds it; set e.g. ``x86-64-v3`` for a portable build).
"""

from __future__ import annotations

import os
import platform
import sys

from setuptools import setup


def _extension_kwargs() -> dict:
    mode = os.environ.get("METANORM_BUILD_EXT", "auto")
    if mode == "0" or sys.platform == "win32":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        if mode == "1":
            raise
        print(
            "metanorm: torch is not importable by this build, so the compiled CPU kernel is "
            "skipped (plain PyTorch is used instead). Install torch first and build with "
            "`pip install --no-build-isolation` to get it.",
            file=sys.stderr,
        )
        return {}
    args = ["-O3", "-fno-wrapv"]  # Python's -fwrapv blocks loop optimisations (3x slower)
    native = "native" if platform.machine() in ("x86_64", "AMD64") else ""
    arch = os.environ.get("METANORM_CPU_ARCH", native)
    if arch:
        args.append(f"-march={arch}")
    ext = CppExtension("metanorm._C", ["src/metanorm/csrc/low_rank.cpp"], extra_compile_args=args)

    class OptionalBuild(BuildExtension.with_options(use_ninja=False)):  # type: ignore[misc]
        """A failed compile leaves the package without the kernel, unless it was required."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:
                if mode == "1":
                    raise
                print(
                    f"metanorm: building the compiled CPU kernel failed ({exc}); plain PyTorch "
                    "is used instead. Set METANORM_BUILD_EXT=1 to make this an error.",
                    file=sys.stderr,
                )

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuild}}


setup(**_extension_kwargs())
