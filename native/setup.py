"""Builds ``metanorm_native._C`` against the torch installed in the building environment.

Build without isolation, after torch: ``pip install --no-build-isolation ./native``. GCC or
Clang; no ``-march`` by default (portable): on x86-64 the kernel holds AVX-512, AVX2 and
baseline variants and picks one at run time. Environment variables:

- ``METANORM_NATIVE_ARCH``: add ``-march=<value>`` (e.g. ``native``; the build then runs only
  on CPUs like the one that built it).
- ``METANORM_NATIVE_OPENMP``: ``1`` to compile with ``-fopenmp``, ``0`` without. By default it is
  on for Linux builds against a torch whose intra-op backend is OpenMP: ``at::parallel_for`` in
  an extension is inline code that runs serially unless the extension itself is compiled with
  OpenMP. The module then uses the libgomp that torch has already loaded (same soname), so one
  thread pool serves both and ``torch.set_num_threads`` applies. (Apple's clang has no
  ``-fopenmp``: macOS builds are serial unless told otherwise.)
"""

import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # pragma: no cover - a build without torch
    raise SystemExit(
        "metanorm-native is compiled against the installed torch: install torch first, then "
        "build without isolation: pip install --no-build-isolation ./native"
    ) from exc

if sys.platform == "win32":  # pragma: no cover
    raise SystemExit("metanorm-native needs GCC or Clang (vector extensions); metanorm does not")

# -fno-wrapv undoes Python's -fwrapv, which blocks the loop optimisations (measured 3x slower)
args = ["-O3", "-fno-wrapv", "-Wno-psabi"]
arch = os.environ.get("METANORM_NATIVE_ARCH", "").strip()
if arch:
    args.append(f"-march={arch}")
link_args: list[str] = []
openmp = os.environ.get("METANORM_NATIVE_OPENMP", "").strip()
if openmp == "1" or (
    not openmp and sys.platform.startswith("linux") and torch.backends.openmp.is_available()
):
    args.append("-fopenmp")
    link_args.append("-fopenmp")


class Build(BuildExtension.with_options(use_ninja=False)):  # type: ignore[misc]
    """Always recompiles: setuptools' timestamp check would keep objects built with other flags."""

    def finalize_options(self) -> None:  # noqa: D102
        super().finalize_options()
        self.force = True


setup(
    install_requires=[f"torch=={torch.__version__.split('+')[0]}"],
    ext_modules=[
        CppExtension(
            "metanorm_native._C",
            ["csrc/low_rank.cpp"],
            depends=["csrc/low_rank_kernel.h"],
            extra_compile_args=args,
            extra_link_args=link_args,
        )
    ],
    cmdclass={"build_ext": Build},
)
