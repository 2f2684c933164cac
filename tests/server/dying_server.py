"""`python -m tests.server.dying_server ARGS` is `python -m server ARGS` whose every forward pass
raises, as on a lost device: its engine dies at the first request (tests/server/test_faults.py
checks that the process then exits non-zero)."""

import sys

from goat_runtime.model.llama import LlamaForCausalLM
from server.cli import main


def _lost_device(self, input_ids, positions):
    raise RuntimeError("injected: device lost")


if __name__ == "__main__":
    LlamaForCausalLM.forward = _lost_device
    sys.exit(main(sys.argv[1:]))
