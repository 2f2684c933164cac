"""Builds the CPU kernels (goat_runtime._C: routed low-rank op, paged decode attention) against
the installed torch."""

import os
from glob import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# Vectorize for the machine that builds (servers build where they run); GOAT_CPU_ARCH overrides
# it for portable images, e.g. GOAT_CPU_ARCH=x86-64-v3.
arch = os.environ.get("GOAT_CPU_ARCH", "native")

setup(
    ext_modules=[
        CppExtension(
            "goat_runtime._C",
            sorted(glob("goat_runtime/ops/cpu/*.cpp")),
            depends=glob("goat_runtime/ops/cpu/*.h"),
            extra_compile_args=["-O3", f"-march={arch}", "-ffp-contract=fast"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
