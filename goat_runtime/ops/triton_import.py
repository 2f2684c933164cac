"""Triton for the GPU ops (triton_kernel.py, triton_attention.py), or an ImportError that names
the extra which installs it. Only the CUDA paths, and the tests under TRITON_INTERPRET=1, import
this module."""

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("goat-serve's Triton ops need triton (the 'gpu' extra: "
                      "pip install 'goat-serve[gpu]')") from exc

__all__ = ["tl", "triton"]
