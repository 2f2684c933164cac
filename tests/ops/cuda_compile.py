"""Compiling a Triton kernel for CUDA targets with triton's bundled ptxas, on a machine with no
GPU: a check that what the interpreter runs also builds for the hardware. In a subprocess,
since the interpreter patches triton.language in the test process."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module, name, signatures, constexprs, archs = json.loads(sys.argv[1])
kernel = getattr(importlib.import_module(module), name)
for label, signature in signatures.items():
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    for arch in archs:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
        ok = bool(compiled.asm["cubin"]) and f".target sm_{arch}" in compiled.asm["ptx"]
        print(label, arch, "ok" if ok else "bad")
"""


def compile_for_cuda(module: str, kernel: str, signatures: dict[str, dict[str, str]],
                     constexprs: dict[str, int], archs: tuple[int, ...], cache_dir: Path
                     ) -> list[str]:
    """Compile `module.kernel` once per (signature, arch); returns the script's lines
    ("<label> <arch> ok"), raising AssertionError with its stderr if it failed."""
    import json

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    arguments = json.dumps([module, kernel, signatures, constexprs, list(archs)])
    result = subprocess.run([sys.executable, "-c", SCRIPT, arguments], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("\n")[:-1]
