"""`goat-serve adapters inspect|validate|train`: the adapter tools beside the server's CLI.

inspect_adapter reads only adapter_config.json and the safetensors header (shapes and dtypes, no
tensor data); validate_adapter loads the adapter exactly as the server would, against the Linear
shapes of a base model computed from its config.json alone (the model is built on the meta
device: no weights are read). Pickle checkpoints are never opened.

    goat-serve adapters inspect PATH [--json]
    goat-serve adapters validate PATH [--model DIR] [--max-lora-rank N] [--json]
    goat-serve adapters train --help   (goat_runtime.training.train)
"""

import argparse
import contextlib
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from goat_runtime.adapters.binding import base_linear_shapes
from goat_runtime.adapters.format import (
    CONFIG_FILE,
    KEY_PREFIX,
    AdapterError,
    InitSignature,
    find_weights,
    load_adapter,
    lora_scale,
    read_config,
)

DEFAULT_MAX_RANK = 64  # the server's default --max-lora-rank

# The tensor keys of PEFT LoRA and GOAT-PEFT checkpoints (KEY_PREFIX stripped).
_KEY = re.compile(
    r"(?P<module>.+?)\.(?:lora_[AB](?:\.\d+)?|lora_gating|"
    r"(?P<twin>moe_layer\.experts\.\d+\.lora_[AB]))\.weight")


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Describe the adapter directory `path` from its config and safetensors header.

    Keys: name, path, kind ("GOAT" or "LORA"), base_model_name_or_path, target_modules and
    exclude_modules (as the config gives them; None when it excludes nothing), modules
    (adapted module names found in the weights), rank (total, all experts), lora_alpha, scale,
    num_experts, top_k, expert_rank and init_signature (GOAT; None for LoRA), use_rslora,
    rank_pattern, alpha_pattern, dtypes, num_tensors, num_parameters (what the server loads;
    GOAT's duplicate moe_layer copies excluded), stored_parameters, size_bytes (of the weights
    file). Raises AdapterError if the directory is not a readable GOAT or LoRA adapter.
    """
    path = Path(path)
    config = read_config(path)
    config_file = path / CONFIG_FILE
    weights_file = find_weights(path)
    kind = config.get("peft_type")
    if kind not in ("GOAT", "LORA"):
        raise AdapterError(f"{config_file}: unknown peft_type {kind!r}; expected 'GOAT' or 'LORA'")
    rank, alpha = (_positive(config, key, config_file) for key in ("r", "lora_alpha"))
    tensors = _read_header(weights_file)
    modules, unrecognized = set(), []
    num_parameters = stored_parameters = 0
    for key, (_, shape) in tensors.items():
        numel = math.prod(shape)
        stored_parameters += numel
        match = _KEY.fullmatch(key.removeprefix(KEY_PREFIX)) if key.startswith(KEY_PREFIX) \
            else None
        if match is None:
            unrecognized.append(key)
            continue
        modules.add(match["module"])
        if not match["twin"]:
            num_parameters += numel
    info: dict[str, Any] = {
        "name": path.name,
        "path": str(path),
        "kind": kind,
        "base_model_name_or_path": str(config.get("base_model_name_or_path") or ""),
        "target_modules": config.get("target_modules"),
        "exclude_modules": config.get("exclude_modules") or None,
        "modules": sorted(modules, key=_module_sort_key),
        "rank": rank,
        "lora_alpha": alpha,
        "use_rslora": bool(config.get("use_rslora")),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "num_experts": None,
        "top_k": None,
        "expert_rank": None,
        "init_signature": None,
        "dtypes": sorted({dtype for dtype, _ in tensors.values()}),
        "num_tensors": len(tensors),
        "num_parameters": num_parameters,
        "stored_parameters": stored_parameters,
        "size_bytes": weights_file.stat().st_size,
        "unrecognized_keys": unrecognized,
    }
    if kind == "GOAT":
        num_experts, top_k = config.get("num_experts"), config.get("top_k")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise AdapterError(f"{config_file}: num_experts must be a positive integer, found "
                               f"{num_experts!r}")
        if not isinstance(rank, int) or rank % num_experts:
            raise AdapterError(f"{config_file}: r={rank!r} is not divisible by "
                               f"num_experts={num_experts}")
        expert_rank = rank // num_experts
        init_type, init_cof = config.get("init_type"), config.get("init_cof")
        info.update(num_experts=num_experts, top_k=top_k, expert_rank=expert_rank,
                    scale=lora_scale(alpha, expert_rank))
        if isinstance(init_cof, int | float) and not isinstance(init_cof, bool):
            signature = InitSignature(rank, num_experts, str(init_type), float(init_cof))
            info["init_signature"] = {"rank": rank, "num_experts": num_experts,
                                      "init_type": init_type, "init_cof": float(init_cof),
                                      "slug": signature.slug()}
    else:
        info["scale"] = lora_scale(alpha, rank, info["use_rslora"])
    return info


def _describe_base(model_dir: Path) -> str:
    from goat_runtime.model import ModelConfig

    c = ModelConfig.from_pretrained(model_dir)
    return (f"{c.model_type}, {c.num_layers} layers, hidden size {c.hidden_size}, "
            f"intermediate size {c.intermediate_size}, {c.num_heads} heads / {c.num_kv_heads} "
            f"KV heads of {c.head_dim}")


def validate_adapter(path: str | Path, model_dir: str | Path, *,
                     max_rank: int = DEFAULT_MAX_RANK) -> list[str]:
    """Check that the adapter at `path` can be served on the base model at `model_dir`.

    Loads the adapter as the server does (every key, shape, dtype and option checked, values
    finite) and, for GOAT, that each target weight can host the static components. Raises
    AdapterError naming the file, key, expected and found values on the first problem; returns
    warnings that do not prevent serving (e.g. a different recorded base model name).
    """
    path, model_dir = Path(path), Path(model_dir)
    shapes = base_linear_shapes(model_dir)
    try:
        adapter = load_adapter(path, shapes, max_rank=max_rank)
    except AdapterError as exc:
        config = path / CONFIG_FILE
        recorded = ""
        if config.is_file():
            with contextlib.suppress(ValueError, AttributeError):
                recorded = json.loads(config.read_text()).get("base_model_name_or_path") or ""
        raise AdapterError(
            f"{exc}\n(checked against the base model {model_dir}: {_describe_base(model_dir)}; "
            f"the adapter records its base model as {recorded or '(not recorded)'!r})") from None
    if adapter.signature is not None:
        from goat_runtime.adapters.static import selected_indices

        for module in adapter.layers:
            try:
                selected_indices(min(shapes[module]), adapter.signature)
            except ValueError as exc:
                raise AdapterError(
                    f"{path}: {module} {list(shapes[module])} cannot host the GOAT static "
                    f"components of {adapter.signature.slug()}: {exc}") from None
    warnings = []
    base_name = adapter.base_model_name_or_path
    if not base_name:
        warnings.append(f"{path / CONFIG_FILE} records no base_model_name_or_path; the shapes "
                        f"fit {model_dir.name}, but whether it was trained on it is unknown")
    elif base_name.rstrip("/").rsplit("/", 1)[-1] != model_dir.resolve().name:
        warnings.append(f"{path / CONFIG_FILE} says the adapter was trained on {base_name!r}; "
                        f"its shapes fit {model_dir}, but its weights may differ")
    return warnings


def _positive(config: dict[str, Any], key: str, config_file: Path) -> int | float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise AdapterError(f"{config_file}: {key} must be a positive number, found {value!r}")
    return value


def _read_header(weights_file: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor key -> (dtype, shape), from the header only."""
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            return {key: (f.get_slice(key).get_dtype(), list(f.get_slice(key).get_shape()))
                    for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(
            f"{weights_file}: not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None


def _module_sort_key(name: str) -> tuple[tuple[int, int, str], ...]:
    # model.layers.10 after model.layers.9
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


# Command line


def _format_inspect(info: dict[str, Any]) -> str:
    targets = info["target_modules"]
    targets = ", ".join(targets) if isinstance(targets, list) else f"regex {targets!r}"
    if info["kind"] == "GOAT":
        rank = (f"{info['rank']} ({info['num_experts']} experts of rank {info['expert_rank']}, "
                f"top-{info['top_k']} routing)")
    else:
        rank = str(info["rank"])
        if info["rank_pattern"]:
            rank += f" (rank_pattern {json.dumps(info['rank_pattern'])})"
    if info["kind"] == "GOAT":
        divisor = f"expert rank {info['expert_rank']}"
    else:
        divisor = f"sqrt(r {info['rank']}), rsLoRA" if info["use_rslora"] else f"r {info['rank']}"
    scale = f"{info['scale']:g} (lora_alpha {info['lora_alpha']:g} / {divisor})"
    if info["alpha_pattern"]:
        scale += f" (alpha_pattern {json.dumps(info['alpha_pattern'])})"
    rows = [
        ("kind", f"{info['kind']} adapter"),
        ("path", info["path"]),
        ("base model", info["base_model_name_or_path"] or "(not recorded)"),
        ("target modules", f"{targets} ({len(info['modules'])} modules in the weights)"),
    ]
    if info["exclude_modules"]:
        excluded = info["exclude_modules"]
        rows.append(("excluded", ", ".join(map(str, excluded)) if isinstance(excluded, list)
                     else f"regex {excluded!r}"))
    rows += [
        ("rank", rank),
        ("scale", scale),
    ]
    if info["kind"] == "GOAT":
        signature = info["init_signature"]
        rows.append(("init signature", signature["slug"] if signature else "(invalid init_cof)"))
    rows.append(("size", f"{info['size_bytes']:,} bytes, {info['num_parameters']:,} parameters "
                         f"({', '.join(info['dtypes'])})"))
    if info["stored_parameters"] != info["num_parameters"]:
        rows.append(("stored", f"{info['stored_parameters']:,} parameters (duplicate copies "
                               f"included)"))
    if info["unrecognized_keys"]:
        rows.append(("unrecognized", f"{len(info['unrecognized_keys'])} key(s), e.g. "
                                     f"{info['unrecognized_keys'][0]}"))
    return "\n".join([info["name"]] + [f"  {label:<16}{value}" for label, value in rows])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="goat-serve adapters",
        description="Inspect, validate or train GOAT and LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="describe an adapter (config and header only)")
    inspect.add_argument("path", type=Path, help="adapter directory")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    validate = commands.add_parser("validate", help="check an adapter against a base model")
    validate.add_argument("path", type=Path, help="adapter directory")
    validate.add_argument("--model", type=Path, default=None,
                          help="base model directory (default: the embedded default model, "
                               "converted on first use)")
    validate.add_argument("--max-lora-rank", type=int, default=DEFAULT_MAX_RANK,
                          help=f"largest total rank accepted (default {DEFAULT_MAX_RANK})")
    validate.add_argument("--json", action="store_true", help="print JSON")
    commands.add_parser("train", add_help=False,
                        help="train a small GOAT adapter on a synthetic task (see train --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `inspect`, `validate` or `train`; returns the exit status (0 ok, 1 invalid adapter)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser (and heavy imports), only when asked for
        from goat_runtime.training.train import main as train_main

        return train_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            info = inspect_adapter(args.path)
            print(json.dumps(info, indent=2) if args.json else _format_inspect(info))
            return 0
        model_dir = args.model
        if model_dir is None:
            from goat_runtime.default_model import default_model_dir

            model_dir = default_model_dir()
        warnings = validate_adapter(args.path, model_dir, max_rank=args.max_lora_rank)
    except (ValueError, RuntimeError) as exc:  # AdapterError, bad base config, no default model
        if args.json:
            print(json.dumps({"ok": False, "path": str(args.path), "error": str(exc)}, indent=2))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, "path": str(args.path), "model": str(model_dir),
                          "warnings": warnings}, indent=2))
    else:
        print(f"OK: {args.path} can be served on {model_dir}")
        for warning in warnings:
            print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
