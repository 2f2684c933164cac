"""The CPU path of the GOAT linear layers (slot-sorted, rows trimmed to those in use, one gate
call per layer) against a dense per-token reference, at tensor parallel 1 and at a simulated
tensor parallel 2 whose ranks number the slots differently (as vLLM's workers do). Runs in
goat-serve's own environment: the layer mixin is driven directly, vLLM's all-reduce is stood in
for by threads."""

import sys
import threading
import types
from types import SimpleNamespace

import torch

from goat_runtime.ops.reference import gate_from_logits
from goat_runtime.vllm_plugin.layers import GoatLinearMixin

MAX_RANK = 32
# slot contents: (E, k, rank_e, rows in use); E = 0 is plain LoRA
ADAPTERS = [(4, 2, 2, 20), (0, 0, 0, 8), (8, 2, 1, 24)]


def _weights(d_in: int, widths: list[int], gen: torch.Generator):
    a, b = [], []
    for width in widths:
        a.append([torch.randn(rows, d_in, generator=gen) for *_, rows in ADAPTERS])
        b.append([torch.randn(width, rows, generator=gen) for *_, rows in ADAPTERS])
    return a, b


def _layer(a, b, widths, slot_of: list[int], slots: torch.Tensor, tp_size: int = 1):
    """A GOAT layer whose slot slot_of[j] holds adapter j."""
    layer = type("Layer", (GoatLinearMixin,), {"goat_row_parallel": tp_size > 1})()
    n = len(ADAPTERS)
    layer.n_slices, layer.output_slices, layer.tp_size = len(widths), widths, tp_size
    layer.device = "cpu"
    d_in = a[0][0].shape[1]
    layer.lora_a_stacked = [torch.zeros(n, 1, MAX_RANK, d_in) for _ in widths]
    layer.lora_b_stacked = [torch.zeros(n, 1, w, MAX_RANK) for w in widths]
    layer.goat_meta = torch.zeros(n + 1, len(widths), 3, dtype=torch.long)
    layer.goat_num_experts = [0] * (n + 1)
    layer.goat_slots, layer.goat_rows, layer.goat_views = set(), [0] * n, [None] * n
    for j, slot in enumerate(slot_of):
        rows = ADAPTERS[j][3]
        for i in range(len(widths)):
            layer.lora_a_stacked[i][slot, 0, :rows] = a[i][j]
            layer.lora_b_stacked[i][slot, 0, :, :rows] = b[i][j]
        # what LoRAModelManager does: set_lora (the base class's, here by hand), then meta
        layer.goat_rows[slot] = rows
        layer.goat_views[slot] = ([t[slot, 0, :rows].t() for t in layer.lora_a_stacked],
                                  [t[slot, 0, :, :rows].t() for t in layer.lora_b_stacked])
        layer.set_goat_meta(slot, [ADAPTERS[j][:3]] * len(widths))
    layer.punica_wrapper = SimpleNamespace(token_lora_indices=slots)
    return layer


def _reference(x, a, b, widths, adapter_of: list[int]) -> torch.Tensor:
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
            out[t, offset:offset + width] = b[i][j].double() @ (gate * h)
            offset += width
    return out


def _batch(gen):
    adapter_of = torch.randint(-1, len(ADAPTERS), (40,), generator=gen).tolist()
    return adapter_of


def test_cpu_path_matches_reference():
    gen = torch.Generator().manual_seed(0)
    widths = [48, 16, 16]
    a, b = _weights(64, widths, gen)
    adapter_of = _batch(gen)
    slot_of = [2, 0, 1]
    slots = torch.tensor([slot_of[j] if j >= 0 else -1 for j in adapter_of])
    x = torch.randn(len(adapter_of), 64, generator=gen)
    output = torch.zeros(len(adapter_of), sum(widths))
    _layer(a, b, widths, slot_of, slots)._apply_lora_to_output(x, output)
    torch.testing.assert_close(output.double(), _reference(x, a, b, widths, adapter_of),
                               rtol=1e-4, atol=1e-4)


def test_row_parallel_ranks_with_different_slot_numbers(monkeypatch):
    """Two ranks, each holding half of d_in and its own slot numbering: the router logits must
    be summed token by token, not slot-sorted row by row."""
    gen = torch.Generator().manual_seed(1)
    widths = [32]
    a, b = _weights(64, widths, gen)
    adapter_of = _batch(gen)
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
    outputs = {}

    def rank(r: int, slot_of: list[int]) -> None:
        half = slice(32 * r, 32 * (r + 1))
        a_r = [[m[:, half] for m in per_slice] for per_slice in a]
        slots = torch.tensor([slot_of[j] if j >= 0 else -1 for j in adapter_of])
        out = torch.zeros(len(adapter_of), 32)
        _layer(a_r, b, widths, slot_of, slots, tp_size=2)._apply_lora_to_output(
            x[:, half].contiguous(), out)
        outputs[r] = out

    threads = [threading.Thread(target=rank, args=(0, [0, 1, 2]), name="r0"),
               threading.Thread(target=rank, args=(1, [2, 0, 1]), name="r1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    torch.testing.assert_close((outputs[0] + outputs[1]).double(),
                               _reference(x, a, b, widths, adapter_of), rtol=1e-4, atol=1e-4)
