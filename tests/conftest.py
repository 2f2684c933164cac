import os

# Triton kernels run under Triton's interpreter on these GPU-less machines. The variable must be
# set before anything imports triton (torch does, on its first compile-related import).
os.environ.setdefault("TRITON_INTERPRET", "1")
