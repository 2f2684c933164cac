"""The GOAT linear layers' two paths against a dense per-token reference, in goat-serve's own
environment: the layer mixin runs on a stand-in for vLLM's stock layer class (its stacked slot
buffers, set_lora, reset_lora) and for vLLM's CPU punica ops (which index the weights of slot -1
with the last slot, as vLLM 0.32's do). The fused path (the engine's C++ kernel) serves the CPU;
the punica path serves row-parallel layers under tensor parallelism, simulated here by two
threads whose ranks number the slots differently (as vLLM's workers do)."""

import sys
import threading
import types
from types import SimpleNamespace

import pytest
import torch

from goat_runtime.ops.reference import gate_from_logits
from goat_runtime.vllm_plugin.layers import GoatLinearMixin

MAX_RANK = 32
# adapters: (E, k, rank_e, rows in use = E router rows + value rows); E = 0 is plain LoRA
ADAPTERS = [(4, 2, 2, 20), (0, 0, 0, 8), (8, 2, 1, 24)]


class StockLayer:
    """What the mixin uses of vLLM's BaseLinearLayerWithLoRA: per slice, stacked buffers
    lora_a [max_loras, 1, max_rank, d_in] and lora_b [max_loras, 1, width, max_rank] in vLLM's
    LoRA dtype; under tensor parallelism a row-parallel layer holds its rank's d_in columns and
    cuts lora_a itself (slice_lora_a), as vLLM's RowParallelLinearWithLoRA does."""

    def __init__(self, widths: list[int], d_in: int, tp_size: int = 1, tp_rank: int = 0,
                 dtype: torch.dtype = torch.float32):
        self.base_layer = SimpleNamespace()  # merge.py leaves goat_undo here
        self.output_slices, self.n_slices = tuple(widths), len(widths)
        self.tp_size, self.tp_rank, self.device = tp_size, tp_rank, torch.device("cpu")
        self.d_in, self.dtype = d_in // tp_size, dtype

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        rank = lora_config.max_lora_rank
        self.lora_a_stacked = tuple(torch.zeros(max_loras, 1, rank, self.d_in, dtype=self.dtype)
                                    for _ in self.output_slices)
        self.lora_b_stacked = tuple(torch.zeros(max_loras, 1, w, rank, dtype=self.dtype)
                                    for w in self.output_slices)

    def slice_lora_a(self, lora_a: torch.Tensor) -> torch.Tensor:
        return lora_a[:, self.tp_rank * self.d_in : (self.tp_rank + 1) * self.d_in]

    def reset_lora(self, index: int) -> None:
        for t in self.lora_a_stacked + self.lora_b_stacked:
            t[index] = 0

    def set_lora(self, index, lora_a, lora_b) -> None:
        self.reset_lora(index)
        if isinstance(lora_a, torch.Tensor):  # a one-slice layer gets tensors, not lists
            lora_a, lora_b = [lora_a], [lora_b]
        for i, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
            if self.tp_size > 1:
                a = self.slice_lora_a(a)
            self.lora_a_stacked[i][index, 0, : a.shape[0]] = a
            self.lora_b_stacked[i][index, 0, :, : b.shape[1]] = b


class PunicaCPU:
    """vLLM 0.32's CPU shrink and expand: each token's slot indexes the stacked weights."""

    def __init__(self, slots: torch.Tensor):
        self.token_lora_indices = slots

    def add_shrink(self, y, x, lora_a_stacked, scale) -> None:
        for i, a in enumerate(lora_a_stacked):
            y[i] += scale * torch.einsum("ti,tri->tr", x, a[self.token_lora_indices, 0]).float()

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start, add_inputs) -> None:
        offset = offset_start
        for i, (b, width) in enumerate(zip(lora_b_stacked, output_slices, strict=True)):
            y[:, offset : offset + width] += torch.einsum(
                "tr,tor->to", x[i], b[self.token_lora_indices, 0].float()).to(y.dtype)
            offset += width


def make_layer(widths: list[int], d_in: int, tp_size: int = 1, num_slots: int = 3,
               tp_rank: int = 0, dtype: torch.dtype = torch.float32):
    cls = type("Layer", (GoatLinearMixin, StockLayer), {"goat_row_parallel": tp_size > 1})
    layer = cls(widths, d_in, tp_size, tp_rank, dtype)
    layer.create_lora_weights(num_slots, SimpleNamespace(max_lora_rank=MAX_RANK))
    return layer


def fill(layer, slot: int, j: int, a, b) -> None:
    """What LoRAModelManager.activate_adapter does with the hook: set_lora (the served dtype),
    then the meta and the float32 routers (the first E rows of each shrink, unsharded)."""
    e = ADAPTERS[j][0]
    layer.set_lora(slot, [a[i][j].to(layer.dtype) for i in range(layer.n_slices)],
                   [b[i][j].to(layer.dtype) for i in range(layer.n_slices)])
    layer.set_goat_meta(slot, [ADAPTERS[j][:3]] * layer.n_slices, None,
                        [a[i][j][:e] if e else None for i in range(layer.n_slices)])


def weights(d_in: int, widths: list[int], gen: torch.Generator):
    a = [[torch.randn(rows, d_in, generator=gen) for *_, rows in ADAPTERS] for _ in widths]
    b = [[torch.randn(w, rows, generator=gen) for *_, rows in ADAPTERS] for w in widths]
    return a, b


def reference(x, a, b, widths, adapter_of: list[int]) -> torch.Tensor:
    out = torch.zeros(x.shape[0], sum(widths), dtype=torch.float64)
    for t, j in enumerate(adapter_of):
        if j < 0:
            continue
        e, k, r, rows = ADAPTERS[j]
        offset = 0
        for i, width in enumerate(widths):
            h = a[i][j].double() @ x[t].double()
            gate = torch.ones(rows, dtype=torch.float64)
            if e:
                gate[:e] = 0
                gate[e:] = gate_from_logits(h[:e].float(), e, k, r, rows - e).double()
            out[t, offset : offset + width] = b[i][j].double() @ (gate * h)
            offset += width
    return out


def run(layer, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    layer.punica_wrapper = PunicaCPU(torch.tensor(slots))
    output = torch.zeros(x.shape[0], sum(layer.output_slices), dtype=x.dtype)
    return layer._apply_lora_to_output(x, output)


def check(output: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(output.double(), expected, rtol=1e-4, atol=1e-4)


def test_fused_path_matches_reference():
    gen = torch.Generator().manual_seed(0)
    widths = [48, 16, 16]
    a, b = weights(64, widths, gen)
    adapter_of = torch.randint(-1, len(ADAPTERS), (40,), generator=gen).tolist()
    slot_of = [2, 0, 1]
    layer = make_layer(widths, 64)
    for j, slot in enumerate(slot_of):
        fill(layer, slot, j, a, b)
    assert layer.goat_fused
    x = torch.randn(len(adapter_of), 64, generator=gen)
    output = run(layer, x, [slot_of[j] if j >= 0 else -1 for j in adapter_of])
    check(output, reference(x, a, b, widths, adapter_of))


def test_slots_refilled_regrown_and_reset():
    """A small adapter first, then a larger one regrows the kernel's copy (rewriting the
    first); a slot refilled with another adapter, then reset, serves it and then nothing."""
    gen = torch.Generator().manual_seed(2)
    widths = [24, 8]
    a, b = weights(32, widths, gen)
    layer = make_layer(widths, 32)
    fill(layer, 0, 1, a, b)  # plain LoRA, 8 rows
    fill(layer, 1, 2, a, b)  # GOAT, E = 8: regrows
    x = torch.randn(6, 32, generator=gen)
    check(run(layer, x, [0, 1, -1, 1, 0, 0]), reference(x, a, b, widths, [1, 2, -1, 2, 1, 1]))
    fill(layer, 0, 0, a, b)  # slot 0 now holds a GOAT adapter with E = 4
    check(run(layer, x, [0, 1, 0, -1, 1, 0]), reference(x, a, b, widths, [0, 2, 0, -1, 2, 0]))
    layer.reset_lora(1)
    check(run(layer, x, [0, 1, 0, -1, 1, 0]), reference(x, a, b, widths, [0, -1, 0, -1, -1, 0]))


def test_merged_static_term_is_undone_where_not_covered():
    """With a static term merged into the base (merge.py's goat_undo: one low-rank term per
    slice), tokens of slot -1 and of slots that do not cover a slice get it subtracted there;
    covered slices of a slot keep it. A reset slot covers nothing."""
    gen = torch.Generator().manual_seed(4)
    widths, d_in, rank = [12, 6], 16, 3
    a, b = weights(d_in, widths, gen)
    cs = [torch.randn(rank, d_in, generator=gen) for _ in widths]
    ds = [torch.randn(w, rank, generator=gen) for w in widths]
    d = torch.block_diag(*ds)  # [sum(widths), rank * slices]: each slice's rows its own term
    layer = make_layer(widths, d_in)
    layer.base_layer.goat_undo = (torch.cat(cs), d, torch.tensor([0] * rank + [1] * rank))
    covered = {0: [True, True], 1: [True, False], 2: [False, False]}
    for slot, j in enumerate((0, 1, 2)):
        layer.set_lora(slot, [a[i][j] for i in range(2)], [b[i][j] for i in range(2)])
        e = ADAPTERS[j][0]
        layer.set_goat_meta(slot, [ADAPTERS[j][:3]] * 2, covered[slot],
                            [a[i][j][:e] if e else None for i in range(2)])
    slots = [-1, 0, 1, 2, 0, -1, 1]
    x = torch.randn(len(slots), d_in, generator=gen)

    def expected(slots: list[int]) -> torch.Tensor:
        out = reference(x, a, b, widths, slots)  # slot s holds adapter s here
        for t, slot in enumerate(slots):
            offset = 0
            for s, width in enumerate(widths):
                if slot < 0 or not covered[slot][s]:
                    out[t, offset : offset + width] -= (ds[s] @ cs[s]).double() @ x[t].double()
                offset += width
        return out

    check(run(layer, x, slots), expected(slots))
    layer.reset_lora(0)
    covered[0] = [False, False]
    slots = [-1, 1, 2, 1, 2, -1, 1]  # slot 0 holds nothing now
    check(run(layer, x, slots), expected(slots))


def test_slot_without_meta_is_refused():
    gen = torch.Generator().manual_seed(3)
    a, b = weights(16, [8], gen)
    layer = make_layer([8], 16)
    layer.set_lora(0, a[0][0], b[0][0])  # a single slice: tensors, not lists
    with pytest.raises(RuntimeError, match="without their GOAT metadata"):
        run(layer, torch.randn(2, 16), [0, 0])


def test_row_parallel_ranks_with_different_slot_numbers(monkeypatch):
    """Two ranks, each holding half of d_in and its own slot numbering, on the punica path:
    the router logits are summed token by token, and the base tokens (slot -1) get nothing
    though the stand-in's ops give them the last slot's rows."""
    gen = torch.Generator().manual_seed(1)
    widths = [32]
    a, b = weights(64, widths, gen)
    adapter_of = torch.randint(-1, len(ADAPTERS), (40,), generator=gen).tolist()
    x = torch.randn(len(adapter_of), 64, generator=gen)
    barrier, parts = threading.Barrier(2), {}

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        parts[threading.current_thread().name] = t.clone()
        barrier.wait()
        total = parts["r0"] + parts["r1"]
        barrier.wait()
        return total

    distributed = types.ModuleType("vllm.distributed")
    distributed.tensor_model_parallel_all_reduce = all_reduce
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.distributed", distributed)
    outputs, errors = {}, []

    def rank(r: int, slot_of: list[int]) -> None:
        try:
            half = slice(32 * r, 32 * (r + 1))
            layer = make_layer(widths, 64, tp_size=2, tp_rank=r)
            assert not layer.goat_fused
            for j, slot in enumerate(slot_of):
                fill(layer, slot, j, a, b)  # unsharded: the layer cuts its columns
            outputs[r] = run(layer, x[:, half].contiguous(),
                             [slot_of[j] if j >= 0 else -1 for j in adapter_of])
        except BaseException as e:  # surfaced below, not lost in the thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(0, [0, 1, 2]), name="r0"),
               threading.Thread(target=rank, args=(1, [2, 0, 1]), name="r1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    check(outputs[0] + outputs[1], reference(x, a, b, widths, adapter_of))


def test_missing_cpu_kernel_is_a_clear_error(monkeypatch):
    import goat_runtime

    monkeypatch.delattr(goat_runtime, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "goat_runtime._C", None)
    with pytest.raises(RuntimeError, match=r"C\+\+ kernel .* does not load here"):
        make_layer([8], 16)


@pytest.mark.parametrize("path", ["fused", "punica"])
def test_bfloat16_slots_route_with_the_float32_router(path):
    """Served in bfloat16 (vLLM's LoRA dtype under --dtype bfloat16), a slot routes as its
    float32 router does. Expert 1's logit beats expert 0's by 0.0009, under bfloat16's spacing
    near 1 (2^-7): with the router rows rounded to bfloat16 (as vLLM's stacked shrink holds
    them) expert 0 would win. Each expert writes a one-hot output column, so the output names
    the expert chosen. Both paths: the fused kernel (the CPU's) and punica with the gate
    (CUDA's, and the CPU's row-parallel layers)."""
    d_in = 16
    router = torch.zeros(2, d_in)
    router[0, 0] = 1 + 2**-8 + 2**-12  # rounds up to 1 + 2^-7 in bfloat16
    router[1, 0], router[1, 1] = 1.0, 0.005  # 0.005 is not a bfloat16 number either
    x = torch.zeros(5, d_in, dtype=torch.bfloat16)
    x[:, :2] = torch.tensor([1.0, 2.0, 0.5, 1.0, 4.0])[:, None]  # exact in bfloat16
    logits32 = x.float() @ router.T
    logits16 = x.float() @ router.bfloat16().float().T
    assert (logits32.argmax(1) == 1).all() and (logits16.argmax(1) == 0).all()
    assert ((logits32[:, 1] - logits32[:, 0]) / logits32[:, 0] < 2**-7).all()
    # E = 2, k = 1, expert rank 1: rows [router; A_0; A_1], expert e's output is column e.
    shrink = torch.cat([router, torch.eye(d_in)[:1], torch.eye(d_in)[:1]])
    expand = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    layer = make_layer([2], d_in, dtype=torch.bfloat16)
    if path == "punica":
        layer.goat_fused = False
    layer.set_lora(0, shrink.bfloat16(), expand.bfloat16())
    layer.set_goat_meta(0, [(2, 1, 1)], None, [router])
    slots = [0, -1, 0, 0, 0]
    output = run(layer, x, slots).float()
    # The float32 reference's choice, expert 1 (weight 1 after renormalising its top 1), times
    # each token's A row value x[:, 0]; nothing for the base token.
    expected = torch.zeros(5, 2)
    expected[:, 1] = x[:, 0].float()
    expected[1] = 0.0
    assert torch.equal(output, expected), output
