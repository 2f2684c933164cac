"""GOAT static components: the residual's formula, its disk cache, and merging."""

import torch

from goat_runtime.adapters.format import InitSignature
from goat_runtime.adapters.static import (
    StaticComponents,
    covered_modules,
    residual_factors,
    selected_indices,
)

SIG = InitSignature(rank=8, num_experts=4, init_type="goat", init_cof=0.25)
SIG_MINI = InitSignature(rank=8, num_experts=4, init_type="goat_mini", init_cof=0.5)


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a.q_proj": torch.randn(48, 32, generator=gen),
            "a.down_proj": torch.randn(32, 80, generator=gen)}


def test_selected_indices_follow_the_spec():
    # n = 32 singular values, E = 4 experts of rank 2: spans of 8.
    assert selected_indices(32, SIG).tolist() == [0, 1, 8, 9, 16, 17, 24, 25]
    assert selected_indices(32, SIG_MINI).tolist() == [6, 7, 14, 15, 22, 23, 30, 31]


def test_residual_matches_the_reference_formula():
    weight = random_weights()["a.q_proj"]
    c, d = residual_factors(weight, SIG)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    sel = selected_indices(32, SIG)
    expected = -(0.25 / 10) * u[:, sel] @ torch.diag(s[sel]) @ vh[sel]
    torch.testing.assert_close((d @ c).double(), expected, atol=1e-6, rtol=0)


def test_disk_cache_spares_the_svd(tmp_path):
    weights = random_weights()
    first = StaticComponents(weights, tmp_path)
    computed = first.factors(SIG, weights)
    assert first.svd_runs == 2
    first.factors(SIG, weights)  # a second adapter of the same signature
    assert first.svd_runs == 2
    restarted = StaticComponents(random_weights(), tmp_path)  # same values after a restart
    cached = restarted.factors(SIG, weights)
    assert restarted.svd_runs == 0
    for module, (c, d) in computed.items():
        assert torch.equal(cached[module][0], c) and torch.equal(cached[module][1], d)


def test_cache_is_keyed_by_weights_and_signature(tmp_path):
    StaticComponents(random_weights(0), tmp_path).factors(SIG, ["a.q_proj"])
    other_base = StaticComponents(random_weights(1), tmp_path)
    other_base.factors(SIG, ["a.q_proj"])
    other_signature = StaticComponents(random_weights(0), tmp_path)
    other_signature.factors(SIG_MINI, ["a.q_proj"])
    assert other_base.svd_runs == 1 and other_signature.svd_runs == 1


def test_corrupt_cache_is_recomputed(tmp_path):
    StaticComponents(random_weights(), tmp_path).factors(SIG, ["a.q_proj"])
    for f in tmp_path.iterdir():
        f.write_bytes(b"junk")
    again = StaticComponents(random_weights(), tmp_path)
    again.factors(SIG, ["a.q_proj"])
    assert again.svd_runs == 1


def effective_weight(static: StaticComponents, weights, adapter, module) -> torch.Tensor:
    """The weight a request sees: served weight plus its static term."""
    terms = static.static_terms(adapter)
    w = weights[module].clone()
    if module in terms:
        c, d = terms[module]
        w += d @ c
    return w


class FakeAdapter:
    def __init__(self, signature, modules):
        self.signature, self.layers = signature, dict.fromkeys(modules)


def test_merge_changes_nothing_a_request_sees(tmp_path):
    original = random_weights()
    goat = FakeAdapter(SIG, ["a.q_proj", "a.down_proj"])
    mini = FakeAdapter(SIG_MINI, ["a.q_proj"])
    partial = FakeAdapter(SIG, ["a.q_proj"])  # same signature, fewer targets
    expected = {}
    unmerged = StaticComponents(random_weights(), tmp_path)
    for name, adapter in (("goat", goat), ("mini", mini), ("partial", partial), ("base", None)):
        for module in original:
            expected[name, module] = effective_weight(unmerged, original, adapter, module)
    served = random_weights()
    merged = StaticComponents(served, tmp_path)
    merged.merge(SIG, ["a.q_proj", "a.down_proj"])
    assert merged.static_terms(goat) == {}  # the merged signature carries no static term
    for name, adapter in (("goat", goat), ("mini", mini), ("partial", partial), ("base", None)):
        for module in original:
            torch.testing.assert_close(effective_weight(merged, served, adapter, module),
                                       expected[name, module], atol=1e-5, rtol=0)


def weights3(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a.q_proj": torch.randn(48, 32, generator=gen),
            "a.k_proj": torch.randn(16, 32, generator=gen),
            "a.down_proj": torch.randn(32, 80, generator=gen)}


def test_merge_exact_for_later_adapters_of_the_merged_signature(tmp_path):
    """Merged on q_proj and k_proj only; adapters of that signature that came later target a
    superset, a subset and a disjoint set of modules (issue 16 item 3)."""
    later = {"superset": FakeAdapter(SIG, ["a.q_proj", "a.k_proj", "a.down_proj"]),
             "subset": FakeAdapter(SIG, ["a.q_proj"]),
             "disjoint": FakeAdapter(SIG, ["a.down_proj"]),
             "base": None}
    unmerged, original = StaticComponents(weights3(), tmp_path), weights3()
    served = weights3()
    merged = StaticComponents(served, tmp_path)
    merged.merge(SIG, ["a.q_proj", "a.k_proj"])
    for name, adapter in later.items():
        for module in original:
            torch.testing.assert_close(effective_weight(merged, served, adapter, module),
                                       effective_weight(unmerged, original, adapter, module),
                                       atol=1e-5, rtol=0, msg=f"{name} {module}")
    assert set(merged.static_terms(later["superset"])) == {"a.down_proj"}  # only where unmerged


def test_covered_modules_is_the_merged_modules_the_adapter_targets():
    merged = frozenset({"a.q_proj", "a.k_proj"})
    superset = FakeAdapter(SIG, ["a.q_proj", "a.k_proj", "a.down_proj"])
    assert covered_modules(SIG, merged, superset) == merged
    assert covered_modules(SIG, merged, FakeAdapter(SIG, ["a.q_proj"])) == {"a.q_proj"}
    assert covered_modules(SIG, merged, FakeAdapter(SIG, ["a.down_proj"])) == frozenset()
    assert covered_modules(SIG, merged, FakeAdapter(SIG_MINI, ["a.q_proj"])) == frozenset()
    assert covered_modules(SIG, merged, None) == frozenset()
    assert covered_modules(None, frozenset(), superset) == frozenset()
