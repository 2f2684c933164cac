"""Train a small GOAT adapter on a base model, fp32 on the CPU, and save it for serving.

The adapter math is the runtime's own, not a second implementation: every adapted projection
adds `add_routed_lora_reference` (the differentiable test oracle of the serving kernels) on top
of the base projection, with the adapter laid out by `slots.write_slot` exactly as the engine
lays it out, the GOAT static residual included as the slot's static rows, taken from
`StaticComponents` with the adapter's InitSignature. What is trained is therefore what is served,
unmerged or with the residual merged into the base weights (up to float rounding).

GOAT initialisation (GOAT_SPEC section 3, the reference's `goat` / `goat_mini` init): per target
weight W = U diag(S) Vh, expert e gets the rank_e singular triplets `selected_indices` picks,
A_e = sqrt(S_sel / (s rho)) Vh_sel and B_e = U_sel sqrt(S_sel / (s rho)) (s the adapter's scale,
rho = 10), so s B_e A_e = U_e S_e Vh_e / rho; the served weight is W' = W - (init_cof / rho)
sum_e U_e S_e Vh_e; the router is initialised as the reference's `nn.Linear(d_in, E, bias=False)`
(uniform in +-1/sqrt(d_in)); init_cof defaults to the reference's 1/E. With top-k routing the
initial model is NOT the base model: a token's experts add (1/rho) sum_{e in top-k} w_e U_e S_e
Vh_e while W' removes (init_cof/rho) of all E pieces. Only a dense router with uniform weights
and init_cof = 1/E cancels exactly (what the tests check to pin the conventions down).

Load balancing: the reference's per-layer loss E * sum_e f_e P_e (f_e: the fraction of tokens
whose top-k includes expert e, so sum_e f_e = k; P_e: the mean router probability of e), summed
over the adapted modules and added with coefficient aux_loss_coeff (the reference scripts use
1e-3). The reference's expert dropout is not applied (the routed op has none; it is 0.05 there).

Training sequences share their chat template's system prompt: a batch is packed into one flat
token stream whose common prefix is computed once and attended by every sequence (a block
mask), which is exactly the per-sequence computation at a fraction of the cost.

The training loop and its command line are in `train.py`.
"""

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from goat_runtime.adapters.binding import slice_weights
from goat_runtime.adapters.format import GOAT_INIT_TYPES, AdaptedLinear, InitSignature
from goat_runtime.adapters.slots import allocate_slots, write_slot
from goat_runtime.adapters.static import RHO, Factors, StaticComponents, selected_indices
from goat_runtime.adapters.writer import ALL_PROJECTIONS, save_adapter
from goat_runtime.model import LlamaForCausalLM, load_model
from goat_runtime.model.layers import DenseAttention, FusedLinear
from goat_runtime.ops.reference import add_routed_lora_reference
from goat_runtime.ops.routed_lora import RoutedLoRAWeights


@dataclass(frozen=True)
class AdapterSpec:
    """The shape of the GOAT adapter to train (what adapter_config.json will say)."""

    rank: int = 8  # total over all experts
    num_experts: int = 4
    top_k: int = 2
    lora_alpha: float = 16.0  # scale = lora_alpha / expert rank, as the loader computes it
    init_type: str = "goat"  # or "goat_mini"
    init_cof: float | None = None  # None: the reference's default, 1 / num_experts
    # One projection type keeps CPU training in minutes: the routed op's reference loops over
    # tokens in Python, so its cost grows with (tokens x adapted projections).
    target_modules: tuple[str, ...] = ("down_proj",)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.num_experts < 1 or self.rank % self.num_experts:
            raise ValueError(f"rank ({self.rank}) must be a positive multiple of num_experts "
                             f"({self.num_experts})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got "
                             f"{self.top_k}")
        if self.init_type not in GOAT_INIT_TYPES:
            raise ValueError(f"init_type must be one of {', '.join(GOAT_INIT_TYPES)}, got "
                             f"{self.init_type!r}")
        unknown = sorted(set(self.target_modules) - set(ALL_PROJECTIONS))
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of "
                             f"{', '.join(ALL_PROJECTIONS)}; got {list(self.target_modules)}")

    @property
    def expert_rank(self) -> int:
        return self.rank // self.num_experts

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.expert_rank

    @property
    def cof(self) -> float:
        return 1.0 / self.num_experts if self.init_cof is None else self.init_cof

    @property
    def signature(self) -> InitSignature:
        return InitSignature(self.rank, self.num_experts, self.init_type, float(self.cof))


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The reference's per-layer GOAT load-balancing loss, E * sum_e f_e P_e.

    router_logits: [T, E] for T tokens. f_e = (tokens whose top-k includes e) / T, counted
    without gradient; P_e = mean over tokens of softmax(logits)[e]. A uniform router gives k.
    """
    num_tokens, num_experts = router_logits.shape
    probs = torch.softmax(router_logits.float(), dim=-1)
    selected = torch.topk(probs, top_k, dim=-1).indices
    fractions = torch.bincount(selected.reshape(-1), minlength=num_experts).float() / num_tokens
    return num_experts * torch.sum(fractions * probs.mean(dim=0))


@dataclass
class PackedBatch:
    """Sequences packed into one flat stream, their longest common prefix stored once.

    Token i attends token j iff j is not after i in its sequence and j is in the shared prefix
    or in i's own segment; loss_rows/labels: the flat rows whose logits predict each target."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    segments: torch.Tensor  # [T] int64: -1 for the shared prefix, else the sequence index
    loss_rows: torch.Tensor  # [N] int64
    labels: torch.Tensor  # [N] int64

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def attention_mask(self, window: int | None = None) -> torch.Tensor:
        """[T, T] bool, True where attention is allowed."""
        seg, pos = self.segments, self.positions
        mask = (pos[None, :] <= pos[:, None]) & (
            (seg[None, :] == seg[:, None]) | (seg[None, :] == -1))
        if window is not None:
            mask &= pos[None, :] > pos[:, None] - window
        return mask


def pack(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> PackedBatch:
    """Pack sequences (prompt + answer tokens); the loss covers tokens past each prompt."""
    if not sequences or any(len(s) < 2 for s in sequences):
        raise ValueError("every sequence needs at least two tokens")
    shared = min(len(s) for s in sequences) - 1  # every sequence keeps a token of its own
    first = sequences[0]
    for s in sequences[1:]:
        shared = next((i for i in range(shared) if s[i] != first[i]), shared)
    ids, positions, segments = list(first[:shared]), list(range(shared)), [-1] * shared
    loss_rows, labels = [], []
    for index, (s, prompt_len) in enumerate(zip(sequences, prompt_lens, strict=True)):
        start = len(ids)

        def row(j: int, start: int = start) -> int:  # flat row of token j of this sequence
            return j if j < shared else start + j - shared

        ids += s[shared:]
        positions += range(shared, len(s))
        segments += [index] * (len(s) - shared)
        for j in range(max(prompt_len, 1), len(s)):
            loss_rows.append(row(j - 1))
            labels.append(s[j])
    def as_long(v: list[int]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int64)

    return PackedBatch(as_long(ids), as_long(positions), as_long(segments), as_long(loss_rows),
                       as_long(labels))


class GoatTrainer(torch.nn.Module):
    """A frozen base model plus trainable GOAT adapter parameters on its target projections.

    The forward is the runtime model's own (its decoder layers, `DenseAttention` over a packed
    batch instead of the KV cache); a forward hook on each adapted projection adds the routed
    op's reference implementation, with this adapter (and its static residual) in slot 0 of the
    serving layout.
    """

    def __init__(self, model_dir: str | Path, spec: AdapterSpec, *, seed: int = 0,
                 static_cache_dir: Path | None = None):
        super().__init__()
        self.model_dir, self.spec = Path(model_dir), spec
        self.base: LlamaForCausalLM = load_model(self.model_dir, torch.float32, "cpu")
        self.base.eval()
        linears = self.base.fused_linears()
        weights = slice_weights(linears)
        self.modules_by_linear: dict[FusedLinear, list[tuple[int, str]]] = {}
        for linear in linears:
            chosen = [(s, name) for s, name in enumerate(linear.slice_names)
                      if name.rsplit(".", 1)[-1] in spec.target_modules]
            if chosen:
                self.modules_by_linear[linear] = chosen
        self.module_names = [name for chosen in self.modules_by_linear.values()
                             for _, name in chosen]
        if not self.module_names:
            raise ValueError(f"{model_dir}: no Linear layer matches target_modules "
                             f"{list(spec.target_modules)}")
        for name in self.module_names:
            n = min(weights[name].shape)
            if n // spec.num_experts < spec.expert_rank:
                raise ValueError(f"{name} {list(weights[name].shape)} cannot host "
                                 f"{spec.num_experts} experts of rank {spec.expert_rank}")
        # The residual exactly as serving computes it (and from the same disk cache).
        static = StaticComponents(weights, static_cache_dir)
        self.static: dict[str, Factors] = static.factors(spec.signature, self.module_names)
        gen = torch.Generator().manual_seed(seed)
        self.lora_a = torch.nn.ParameterDict()
        self.lora_b = torch.nn.ParameterDict()
        self.router = torch.nn.ParameterDict()
        for name in self.module_names:
            a, b = goat_expert_init(weights[name], spec)
            d_in = a.shape[1]
            bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, as the reference's router
            key = self._key(name)
            self.lora_a[key] = torch.nn.Parameter(a)
            self.lora_b[key] = torch.nn.Parameter(b)
            self.router[key] = torch.nn.Parameter(
                (torch.rand(spec.num_experts, d_in, generator=gen) * 2 - 1) * bound)
        self.router_logits: dict[str, torch.Tensor] = {}  # of the last forward, per module
        # The adapter's slot layout and token slots of the forward under way (`_add_delta`).
        self._slots: dict[str, RoutedLoRAWeights] = {}
        self._token_slots = torch.zeros(0, dtype=torch.int32)
        for linear in self.modules_by_linear:
            linear.register_forward_hook(self._add_delta)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's parameters (the base model's are frozen)."""
        return [*self.lora_a.values(), *self.lora_b.values(), *self.router.values()]

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run the base model itself (no adapter, no static residual) inside the block."""
        saved, self.modules_by_linear = self.modules_by_linear, {}
        try:
            yield
        finally:
            self.modules_by_linear = saved

    @staticmethod
    def _key(module: str) -> str:
        return module.replace(".", "__")  # ParameterDict keys cannot contain dots

    def adapter_layers(self, detach: bool = True) -> dict[str, AdaptedLinear]:
        """Module name -> this adapter's delta (the format load_adapter returns)."""
        layers = {}
        for name in self.module_names:
            key = self._key(name)
            a, b, g = self.lora_a[key], self.lora_b[key], self.router[key]
            if detach:
                a, b, g = a.detach().clone(), b.detach().clone(), g.detach().clone()
            layers[name] = AdaptedLinear(a, b, g, self.spec.top_k, self.spec.scale)
        return layers

    def _slot_weights(self) -> dict[str, RoutedLoRAWeights]:
        """Per adapted module, a one-slot, one-slice serving layout of the adapter (router,
        experts scaled by s, static rows), built differentiably from the parameters."""
        spec, out = self.spec, {}
        for name, layer in self.adapter_layers(detach=False).items():
            c, _ = self.static[name]
            weights = allocate_slots(1, [layer.lora_b.shape[0]], layer.lora_a.shape[1],
                                     value_rows=spec.rank + c.shape[0],
                                     max_experts=spec.num_experts)
            write_slot(weights, 0, [layer], [self.static[name]])
            out[name] = weights
        return out

    def _add_delta(self, linear: FusedLinear, inputs: tuple[torch.Tensor, ...],
                   y: torch.Tensor) -> torch.Tensor:
        """Forward hook on each adapted linear: add the adapter's routed delta (and static
        rows) to the base projection y the model's own FusedLinear computed."""
        (x,) = inputs
        for s, name in self.modules_by_linear.get(linear, ()):
            cols = y[:, linear.out_offsets[s] : linear.out_offsets[s + 1]]
            add_routed_lora_reference(cols, x, self._token_slots, self._slots[name])
            if self.training:
                self.router_logits[name] = x @ self.router[self._key(name)].T
        return y

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """The final-norm hidden states [T, hidden] of every packed token: the model's own
        forward, with dense attention under the batch's block mask instead of a KV cache."""
        self._slots = self._slot_weights() if self.modules_by_linear else {}
        self._token_slots = torch.zeros(batch.num_tokens, dtype=torch.int32)
        self.router_logits = {}
        try:
            hidden: torch.Tensor = self.base(batch.input_ids, batch.positions,
                                             attention=DenseAttention(batch.attention_mask))
            return hidden
        finally:
            self._slots = {}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.base.lm_head).float()

    def losses(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over the target tokens, summed load-balancing loss)."""
        hidden = self.hidden_states(batch)
        lm_loss = F.cross_entropy(self.logits(hidden[batch.loss_rows]), batch.labels)
        aux = sum((load_balancing_loss(logits, self.spec.top_k)
                   for logits in self.router_logits.values()), torch.zeros(()))
        return lm_loss, aux

    @torch.no_grad()
    def sequence_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits [len, vocab] of every position of one sequence, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return self.logits(self.hidden_states(pack([list(token_ids)], [0])))
        finally:
            self.train(was_training)

    @torch.no_grad()
    def greedy(self, token_ids: Sequence[int], max_tokens: int,
               stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation, recomputing the whole sequence at each token (no cache)."""
        tokens, out = list(token_ids), []
        for _ in range(max_tokens):
            token = int(self.sequence_logits(tokens)[-1].argmax())
            out.append(token)
            tokens.append(token)
            if token in stop_ids:
                break
        return out

    def save(self, path: str | Path, base_model_name_or_path: str = "") -> Path:
        """Write the adapter as a GOAT-PEFT folder the server loads."""
        spec = self.spec
        return save_adapter(path, self.adapter_layers(), kind="goat", rank=spec.rank,
                            lora_alpha=spec.lora_alpha,
                            base_model_name_or_path=base_model_name_or_path,
                            init_type=spec.init_type, init_cof=spec.cof)


def goat_expert_init(weight: torch.Tensor, spec: AdapterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's SVD init of the stacked experts: (lora_a [r, d_in], lora_b [d_out, r])
    with s * B_e A_e = U_e S_e Vh_e / rho on the triplets `selected_indices` picks."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    sel = selected_indices(s.shape[0], spec.signature)
    root = torch.sqrt(s[sel] / (spec.scale * RHO))
    return ((root[:, None] * vh[sel]).float().contiguous(),
            (u[:, sel] * root[None, :]).float().contiguous())
