"""The batched gate (`ops.gate.gate_rows`, the vLLM plugin's) equals the reference gate, token by
token."""

import torch

from goat_runtime.ops.gate import gate_rows
from goat_runtime.ops.reference import gate_from_logits


def test_gate_rows_matches_reference():
    gen = torch.Generator().manual_seed(0)
    # (E, k, rank_e, static rows) per token: GOAT slots of different shapes, plain LoRA, none.
    shapes = [(4, 2, 2, 8), (8, 1, 1, 0), (4, 4, 2, 0), (0, 0, 0, 8), (2, 1, 4, 3), (0, 0, 0, 0)]
    num_rows = 32
    tokens = [shapes[int(t)] for t in torch.randint(len(shapes), (64,), generator=gen)]
    logits = torch.randn(len(tokens), 8, generator=gen) * 3
    meta = torch.tensor([(e, k, r) for e, k, r, _ in tokens], dtype=torch.long)
    got = gate_rows(logits, meta, num_rows)
    for t, (e, k, r, _) in enumerate(tokens):
        value_rows = num_rows - e
        expected = gate_from_logits(logits[t, :e], e, k, r, value_rows)
        assert torch.equal(got[t, :e], torch.zeros(e)), t
        torch.testing.assert_close(got[t, e:], expected, rtol=1e-6, atol=1e-7)


def test_gate_rows_without_routers_is_ones():
    meta = torch.zeros(3, 3, dtype=torch.long)
    assert torch.equal(gate_rows(torch.zeros(3, 0), meta, 5), torch.ones(3, 5))
