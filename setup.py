"""Builds the CPU routed low-rank kernel (goat_runtime._C) against the installed torch."""

import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# Vectorize for the machine that builds (servers build where they run); GOAT_CPU_ARCH overrides
# it for portable images, e.g. GOAT_CPU_ARCH=x86-64-v3.
arch = os.environ.get("GOAT_CPU_ARCH", "native")

setup(
    ext_modules=[
        CppExtension(
            "goat_runtime._C",
            ["goat_runtime/ops/cpu/routed_lora.cpp"],
            extra_compile_args=["-O3", f"-march={arch}", "-ffp-contract=fast"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
