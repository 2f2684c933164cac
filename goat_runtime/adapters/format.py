"""Read GOAT-PEFT and PEFT LoRA checkpoints into one normalised in-memory form, checking them.

Both kinds become, per adapted base Linear, an `AdaptedLinear`: stacked expert factors (plain LoRA
is one expert), an optional router and a scale. Reading is pure: it returns a new `Adapter` or
raises `AdapterError` naming the file, the key, what was expected and what was found, so a bad
adapter can never disturb the adapters already being served.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from goat_runtime.adapters.checkpoint import Checkpoint, CheckpointError, parts

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
KEY_PREFIX = "base_model.model."
GOAT_INIT_TYPES = ("goat", "goat_mini")

# PEFT config keys whose non-default values change the math in ways goat-serve does not implement.
_UNSUPPORTED_OPTIONS = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, []),
    "layer_replication": (None, []),
    "fan_in_fan_out": (False, None),
    "megatron_config": (None,),
    "trainable_token_indices": (None,),
}

# PEFT LoRA initialisations that leave the base weights as they are: the saved adapter is the
# whole delta. (EVA sets A from activations and zeroes B; "orthogonal" keeps the base too.)
_BASE_PRESERVING_INITS = (True, False, None, "gaussian", "orthogonal", "eva")
# Those that subtract their initial B A from the base weight (or, LoftQ, quantise it) when the
# adapter is created: the saved factors are a delta from that changed base, which PEFT makes
# again at load and goat-serve does not. Prefix -> how to turn the adapter into a plain LoRA.
_CONVERT = ("convert it to a plain LoRA adapter with PEFT: save_pretrained(OUTPUT_DIR, "
            "path_initial_model_for_weight_conversion=INITIAL_ADAPTER_DIR), where "
            "INITIAL_ADAPTER_DIR holds the adapter as initialised, before training; the result "
            "has rank 2r and init_lora_weights=true")
_BASE_CHANGING_INITS = {
    "pissa": _CONVERT,  # also pissa_niter_<n>
    "olora": _CONVERT,
    "corda": _CONVERT,
    "loftq": ("serve it on the base model LoftQ produced (PEFT's LoftQ recipe saves that base "
              "beside the adapter) with init_lora_weights set to true in this config"),
    "lora_ga": ("serve it on the base model LoRA-GA produced, saved after initialisation, with "
                "init_lora_weights set to true in this config"),
}


class AdapterError(ValueError):
    """An adapter directory that cannot be served; the message says where and why."""


@dataclass(frozen=True)
class InitSignature:
    """What a GOAT adapter's static correction depends on, besides the base weights."""

    rank: int
    num_experts: int
    init_type: str
    init_cof: float

    def slug(self) -> str:
        return f"r{self.rank}-e{self.num_experts}-{self.init_type}-c{self.init_cof:g}"


@dataclass
class AdaptedLinear:
    """One adapter's delta on one base Linear (W: [d_out, d_in]).

    delta(x) = scale * sum_e gate_e(x) * B_e (A_e x); plain LoRA is one expert with gate 1.
    """

    lora_a: torch.Tensor  # [rank, d_in]; expert e owns rows [e*expert_rank, (e+1)*expert_rank)
    lora_b: torch.Tensor  # [d_out, rank]; expert e owns the same columns
    router: torch.Tensor | None  # [E, d_in] for GOAT, None for plain LoRA
    top_k: int  # 0 for plain LoRA
    scale: float

    @property
    def num_experts(self) -> int:
        return 0 if self.router is None else self.router.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def expert_rank(self) -> int:
        return self.rank // max(self.num_experts, 1)


@dataclass
class Adapter:
    """A loaded adapter: its kind, its per-module deltas and, for GOAT, its init signature."""

    name: str
    path: Path
    kind: str  # "goat" or "lora"
    layers: dict[str, AdaptedLinear]  # base module name -> delta
    signature: InitSignature | None  # GOAT only: selects the static correction
    base_model_name_or_path: str

    @property
    def max_rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    @property
    def num_parameters(self) -> int:
        return sum(
            layer.lora_a.numel() + layer.lora_b.numel()
            + (0 if layer.router is None else layer.router.numel())
            for layer in self.layers.values()
        )


def load_adapter(path: str | Path, base_linears: dict[str, tuple[int, int]], *,
                 name: str | None = None, max_rank: int = 64,
                 scale_override: float | None = None) -> Adapter:
    """Read and check the adapter directory `path` against a base model.

    base_linears: the base model's Linear layers, module name -> (d_out, d_in).
    max_rank: the largest total rank (all experts) the server accepts.
    scale_override: the scale to use instead of the config's, for reference runs trained with
      a scale set from the environment (GOAT's SCALING / ETA).
    Pickle checkpoints are refused and never opened.
    """
    path = Path(path)
    config, config_file, peft_type = _checked_config(path)
    weights_file = find_weights(path)
    targets = _match_targets(config, config_file, base_linears)
    try:
        tensors = Checkpoint(weights_file)
    except CheckpointError as exc:
        raise AdapterError(str(exc)) from None
    signature = None
    if peft_type == "GOAT":
        layers, signature, used = _goat_layers(config, config_file, weights_file, tensors,
                                               targets, base_linears, scale_override)
    else:
        layers, used = _lora_layers(config, config_file, weights_file, tensors, targets,
                                    base_linears, scale_override)
    leftover = sorted(tensors.keys() - used)
    excluded = sorted(m for m in _excluded_modules(config, config_file, base_linears)
                      if any(k.startswith(f"{KEY_PREFIX}{m}.") for k in leftover))
    if excluded:
        # PEFT never creates the adapter layer there and ignores such tensors; a file that
        # carries them contradicts its own config, so which of the two is meant is unknown.
        raise AdapterError(
            f"{weights_file}: has tensors for {excluded[0]} ({len(excluded)} module(s) in "
            f"all), which {config_file.name}'s exclude_modules "
            f"{config.get('exclude_modules')!r} excludes from the adapter; remove those tensors "
            f"or the exclude_modules entry")
    if leftover:
        raise AdapterError(
            f"{weights_file}: unexpected key {leftover[0]!r} ({len(leftover)} unexpected in "
            f"all); its module is not a target of the adapter's config or not a Linear layer "
            f"of the base model")
    for module, layer in layers.items():
        if layer.rank > max_rank:
            raise AdapterError(
                f"{weights_file}: {module} has rank {layer.rank}, over the configured maximum "
                f"{max_rank} (--max-lora-rank)")
    return Adapter(
        name=name or path.name, path=path, kind=peft_type.lower(), layers=layers,
        signature=signature,
        base_model_name_or_path=str(config.get("base_model_name_or_path") or ""))


# An adapter_config.json as json.loads reads it.
_Config = dict[str, Any]


def read_signature(path: str | Path, base_linears: dict[str, tuple[int, int]]
                   ) -> tuple[InitSignature | None, frozenset[str]]:
    """An adapter's init signature (None: plain LoRA) and the modules it adapts, from its
    config alone (checked as load_adapter checks it; its weights are only looked for): what a
    server merging static components picks by, without reading a store's worth of weights."""
    path = Path(path)
    config, config_file, peft_type = _checked_config(path)
    find_weights(path)
    modules = frozenset(_match_targets(config, config_file, base_linears))
    return (_init_signature(config) if peft_type == "GOAT" else None), modules


def _init_signature(config: _Config) -> InitSignature:
    """A checked GOAT config's init signature (what selects its static correction)."""
    return InitSignature(config["r"], config["num_experts"], config["init_type"],
                         float(config["init_cof"]))


def _checked_config(path: Path) -> tuple[_Config, Path, str]:
    """The adapter's config, its file and its peft_type, its options checked."""
    config = read_config(path)
    config_file = path / CONFIG_FILE
    peft_type = config.get("peft_type")
    if peft_type not in ("GOAT", "LORA"):
        raise AdapterError(
            f"{config_file}: unknown peft_type {peft_type!r}; expected 'GOAT' or 'LORA'")
    _check_options(config, config_file, peft_type)
    return config, config_file, peft_type


def find_weights(path: Path) -> Path:
    """The adapter's safetensors checkpoint; a pickle checkpoint is refused by name, unopened."""
    weights_file = path / WEIGHTS_FILE
    if weights_file.is_file():
        return weights_file
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"{path}: only safetensors checkpoints are loaded; found the pickle file(s) "
            f"{', '.join(pickles)}, which are never unpickled. Convert to {WEIGHTS_FILE}.")
    raise AdapterError(f"{path}: missing {WEIGHTS_FILE}")


def read_config(path: Path) -> _Config:
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory not found")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(f"{path}: missing {CONFIG_FILE}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_file}: invalid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: expected a JSON object, found {type(config).__name__}")
    return config


def _check_options(config: _Config, config_file: Path, peft_type: str) -> None:
    for key, allowed in _UNSUPPORTED_OPTIONS.items():
        value = config.get(key)
        if value not in allowed and not (value == {} and None in allowed):
            raise AdapterError(
                f"{config_file}: option {key}={value!r} is not supported (supported: "
                f"{' or '.join(repr(a) for a in allowed)})")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise AdapterError(f"{config_file}: {key} must be a positive number, found {value!r}")
    _check_init(config.get("init_lora_weights", True), config_file, peft_type)
    if peft_type == "GOAT":
        _check_goat_options(config, config_file)


def _check_goat_options(config: _Config, config_file: Path) -> None:
    """What a GOAT config needs beyond a LoRA one (r and lora_alpha are checked already)."""
    if config.get("use_rslora"):
        raise AdapterError(f"{config_file}: use_rslora is not supported for GOAT adapters "
                           f"(the GOAT scale is lora_alpha / expert rank)")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterError(f"{config_file}: {key} is not supported for GOAT adapters")
    num_experts, top_k = config.get("num_experts"), config.get("top_k")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise AdapterError(
            f"{config_file}: num_experts must be a positive integer, found {num_experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise AdapterError(
            f"{config_file}: top_k must be an integer in [1, num_experts={num_experts}], "
            f"found {top_k!r}")
    if config["r"] % num_experts:
        raise AdapterError(f"{config_file}: r={config['r']} is not divisible by "
                           f"num_experts={num_experts}")
    if config.get("init_type") not in GOAT_INIT_TYPES:
        raise AdapterError(
            f"{config_file}: init_type {config.get('init_type')!r} is not supported "
            f"(supported: {', '.join(GOAT_INIT_TYPES)})")
    if not isinstance(config.get("init_cof"), int | float):
        raise AdapterError(
            f"{config_file}: init_cof must be a number, found {config.get('init_cof')!r}")


def _check_init(init: object, config_file: Path, peft_type: str) -> None:
    """Refuse an init_lora_weights that changed the base weights the adapter was trained on."""
    name = init.lower() if isinstance(init, str) else init
    if name in _BASE_PRESERVING_INITS:
        return
    prefix = next((p for p in _BASE_CHANGING_INITS if isinstance(name, str)
                   and name.startswith(p)), None)
    if prefix is None:
        raise AdapterError(
            f"{config_file}: init_lora_weights={init!r} is not supported (supported: "
            f"{', '.join(repr(i) for i in _BASE_PRESERVING_INITS)})")
    how = (_BASE_CHANGING_INITS[prefix] if peft_type == "LORA"
           else "GOAT adapters are initialised by init_type (goat or goat_mini) and this "
                "combination is not one goat-serve reproduces")
    raise AdapterError(
        f"{config_file}: init_lora_weights={init!r} is not supported: this initialisation "
        f"changes the base weights, so the saved adapter is a delta from a base goat-serve does "
        f"not have; {how}")


def _module_matches(spec: str | list[str], module: str) -> bool:
    """PEFT's rule for target_modules and exclude_modules: a string is a regular expression
    the whole module name must match; a list matches a module named exactly as an entry or
    ending in '.' + an entry."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == name or module.endswith("." + name) for name in spec)


def _modules_option(config: _Config, config_file: Path, key: str) -> str | list[str] | None:
    """target_modules / exclude_modules: a regex string, a list of names, or None."""
    value = config.get(key)
    if value is None or isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise AdapterError(f"{config_file}: {key} {value!r} is not a valid regular "
                                   f"expression: {exc}") from None
        return value
    raise AdapterError(f"{config_file}: {key} must be a list of module names or a regex "
                       f"string, found {value!r}")


def _excluded_modules(config: _Config, config_file: Path,
                      base_linears: dict[str, tuple[int, int]]) -> set[str]:
    """The base Linear layers the config's exclude_modules keeps unadapted."""
    exclude = _modules_option(config, config_file, "exclude_modules")
    return {m for m in base_linears if exclude and _module_matches(exclude, m)}


def _match_targets(config: _Config, config_file: Path,
                   base_linears: dict[str, tuple[int, int]]) -> list[str]:
    """The base Linear layers the adapter adapts, by PEFT's rule: those target_modules matches
    that exclude_modules does not."""
    target_modules = _modules_option(config, config_file, "target_modules")
    if not target_modules:
        raise AdapterError(
            f"{config_file}: target_modules must be a non-empty list or a regex string, found "
            f"{target_modules!r}")
    for target in target_modules if isinstance(target_modules, list) else []:
        if not any(_module_matches([target], m) for m in base_linears):
            raise AdapterError(
                f"{config_file}: target module {target!r} matches no Linear layer of the base "
                f"model (its Linear layers end with: "
                f"{', '.join(sorted({m.rsplit('.', 1)[-1] for m in base_linears}))})")
    matched = [m for m in base_linears if _module_matches(target_modules, m)]
    if not matched:
        raise AdapterError(f"{config_file}: target_modules {target_modules!r} match no Linear "
                           f"layer of the base model")
    excluded = _excluded_modules(config, config_file, base_linears)
    targets = [m for m in matched if m not in excluded]
    if not targets:
        raise AdapterError(
            f"{config_file}: exclude_modules {config.get('exclude_modules')!r} excludes every "
            f"module target_modules {target_modules!r} matches; nothing is left to adapt")
    return targets


def _check(tensors: Checkpoint, weights_file: Path, key: str, shape: tuple[int, ...]) -> None:
    if key not in tensors:
        raise AdapterError(f"{weights_file}: missing key {key!r}")
    if tensors.shape(key) != shape:
        raise AdapterError(f"{weights_file}: {key} has shape {list(tensors.shape(key))}, "
                           f"expected {list(shape)}")


def _check_all(tensors: Checkpoint, weights_file: Path, keys: list[str],
               shape: tuple[int, ...]) -> None:
    """_check for each key: one pass over the header's entries, the messages only on failure."""
    entries = tensors.entries
    if not all(k in entries and entries[k][1] == shape for k in keys):
        for key in keys:
            _check(tensors, weights_file, key, shape)


def _float32(source: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A new contiguous float32 tensor holding `source` (any float dtype, any strides), viewed
    as `shape`; one conversion and copy, nothing shared with the file."""
    out = torch.empty(source.shape, dtype=torch.float32)
    for part in parts(source.shape):  # on this thread only (see checkpoint.SERIAL_NUMEL)
        out[part].copy_(source[part])
    return out if shape is None else out.view(shape)


def _kinds(modules: list[str], tensors: Checkpoint, first_key: str
           ) -> list[list[str]]:
    """`modules` grouped by kind (the name without its layer numbers: every layer's q_proj),
    each group in the order its `first_key` tensors lie in the file, so that one kind's
    tensors of every layer are one strided view where the writer laid them out evenly."""
    groups: dict[str, list[str]] = {}
    for module in modules:
        groups.setdefault(_LAYER_NUMBER.sub(".#.", module), []).append(module)
    return [sorted(group, key=lambda m: tensors.entries[first_key.format(m)][2])
            for group in groups.values()]


_LAYER_NUMBER = re.compile(r"\.\d+\.")


def _goat_layers(config: _Config, config_file: Path, weights_file: Path, tensors: Checkpoint,
                 targets: list[str], base_linears: dict[str, tuple[int, int]],
                 scale_override: float | None
                 ) -> tuple[dict[str, AdaptedLinear], InitSignature, set[str]]:
    """The GOAT adapter's layers, its signature and the checkpoint keys they were read from."""
    rank, num_experts, top_k = config["r"], config["num_experts"], config["top_k"]
    expert_rank = rank // num_experts
    # _check_options admits only goat / goat_mini (no rsLoRA scale) and no patterns
    scale = scale_override if scale_override is not None else lora_scale(
        config["lora_alpha"], expert_rank)
    # Key names are made once per expert and joined to each module's prefix: 7,000 keys of
    # str.format cost more than the rest of the checks.
    suffixes = {name: [f".{name.format(e)}.weight" for e in range(num_experts)]
                for name in ("lora_A.{}", "lora_B.{}", "moe_layer.experts.{}.lora_A",
                             "moe_layer.experts.{}.lora_B")}

    def keys(module: str, name: str) -> list[str]:
        prefix = KEY_PREFIX + module
        return [prefix + suffix for suffix in suffixes[name]]

    a_of = {m: keys(m, "lora_A.{}") for m in targets}
    b_of = {m: keys(m, "lora_B.{}") for m in targets}
    for module in targets:
        d_out, d_in = base_linears[module]
        _check_all(tensors, weights_file, a_of[module], (expert_rank, d_in))
        _check_all(tensors, weights_file, b_of[module], (d_out, expert_rank))
        _check(tensors, weights_file, f"{KEY_PREFIX}{module}.lora_gating.weight",
               (num_experts, d_in))
    used = {f"{KEY_PREFIX}{m}.lora_gating.weight" for m in targets}
    for module in targets:
        used.update(a_of[module], b_of[module])
    layers = {}
    # One kind of module at a time (every layer's q_proj: one shape), so that each step below
    # is one operation over all of them: per-tensor work costs more than the bytes.
    for group in _kinds(targets, tensors, KEY_PREFIX + "{}.lora_A.0.weight"):
        d_out, d_in = base_linears[group[0]]
        a_keys = [a_of[m] for m in group]
        b_keys = [b_of[m] for m in group]
        # The reference's twin copies (moe_layer.experts.<e>), where saved, must be the same
        # values as the experts (compared as whole byte ranges: Checkpoint.same).
        for kind, main in (("A", a_keys), ("B", b_keys)):
            twins = [keys(m, f"moe_layer.experts.{{}}.lora_{kind}") for m in group]
            pairs = [(t, k) for t_row, k_row in zip(twins, main, strict=True)
                     for t, k in zip(t_row, k_row, strict=True) if t in tensors]
            used.update(t for t, _ in pairs)
            if len(pairs) == len(group) * num_experts:
                differs = tensors.same(twins, main)
            else:
                differs = (tensors.same([[t for t, _ in pairs]], [[k for _, k in pairs]])
                           if pairs else None)
            if differs:
                raise AdapterError(
                    f"{weights_file}: {differs} differs from its twin "
                    f"{differs.replace('moe_layer.experts.', '').replace('lora_', '')}; the "
                    f"reference saves identical copies")
        # Expert e owns A's rows and B's columns [e*expert_rank, (e+1)*expert_rank). Copies:
        # nothing keeps the file's bytes alive.
        count = len(group)
        a = _float32(tensors.stack(a_keys), (count, rank, d_in))
        b = _float32(tensors.stack(b_keys).permute(0, 2, 1, 3), (count, d_out, rank))
        routers = _float32(tensors.stack([[f"{KEY_PREFIX}{m}.lora_gating.weight"]
                                          for m in group]), (count, num_experts, d_in))
        for i, module in enumerate(group):
            layers[module] = AdaptedLinear(a[i], b[i], routers[i], top_k, scale)
    return {module: layers[module] for module in targets}, _init_signature(config), used


def lora_scale(alpha: float, rank: float, use_rslora: bool = False) -> float:
    """PEFT's scale: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (for GOAT, r is the
    expert rank)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def _pattern_value(patterns: dict[str, object], module: str, default: object) -> object:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _lora_layers(config: _Config, config_file: Path, weights_file: Path, tensors: Checkpoint,
                 targets: list[str], base_linears: dict[str, tuple[int, int]],
                 scale_override: float | None) -> tuple[dict[str, AdaptedLinear], set[str]]:
    """The LoRA adapter's layers and the checkpoint keys they were read from."""
    layers, used = {}, set()
    for module in targets:
        d_out, d_in = base_linears[module]
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"{config_file}: rank for {module} must be a positive integer, "
                               f"found {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
            raise AdapterError(f"{config_file}: lora_alpha for {module} must be a positive "
                               f"number, found {alpha!r}")
        scale = scale_override if scale_override is not None else lora_scale(
            alpha, rank, bool(config.get("use_rslora")))
        prefix = KEY_PREFIX + module
        a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        _check(tensors, weights_file, a_key, (rank, d_in))
        _check(tensors, weights_file, b_key, (d_out, rank))
        used |= {a_key, b_key}
        layers[module] = AdaptedLinear(_float32(tensors.tensor(a_key)),
                                       _float32(tensors.tensor(b_key)), None, 0, scale)
    return layers, used

