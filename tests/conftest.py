import os

from tests.devices import use_triton_interpreter

pytest_plugins = ["tests.s3"]  # the S3 server fixtures (s3_server, s3)

# Where torch sees no CUDA device, Triton kernels run under Triton's interpreter on the CPU; on a
# CUDA machine they are compiled (unless TRITON_INTERPRET=1 was asked for). The variable must be
# set before anything imports triton, which importing torch does not do.
os.environ["TRITON_INTERPRET"] = "1" if use_triton_interpreter() else "0"
