"""GOAT's static components: the SVD residual the reference subtracts from each target weight.

For an init signature (r, E, init_type, init_cof) the reference serves W' = W + D C with
C = Vh[sel] and D = -(init_cof / 10) U[:, sel] diag(S[sel]) (GOAT_SPEC section 3). The factors
depend only on W and the signature, so they are computed once per (base weights, signature),
cached on disk under a digest of the weights, and shared by every adapter of that signature.

One signature can be merged into the base weights. Whatever is merged is undone, as a low-rank
term, for every request that must not see it (base requests, other signatures, modules an
adapter does not target), so merging changes speed, never results.
"""

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from goat_runtime.adapters.format import Adapter, InitSignature

logger = logging.getLogger(__name__)

RHO = 10.0  # the reference code's constant: the correction is scaled by init_cof / RHO

Factors = tuple[torch.Tensor, torch.Tensor]  # (C [rank, d_in], D [d_out, rank]): delta W = D C


def default_cache_dir() -> Path:
    root = os.environ.get("GOAT_CACHE_DIR") or Path.home() / ".cache" / "goat-serve"
    return Path(root) / "static"


def selected_indices(n: int, signature: InitSignature) -> torch.Tensor:
    """The singular triplets the reference's init takes: rank_e at E evenly spaced places."""
    expert_rank = signature.rank // signature.num_experts
    span = n // signature.num_experts
    if span < expert_rank:
        raise ValueError(f"a weight with {n} singular values cannot host {signature.num_experts} "
                         f"experts of rank {expert_rank}")
    if signature.init_type == "goat":
        starts = [e * span for e in range(signature.num_experts)]
    else:  # goat_mini: the smallest singular values of each span
        starts = [(e + 1) * span - expert_rank for e in range(signature.num_experts)]
    return torch.cat([torch.arange(s, s + expert_rank) for s in starts])


def residual_factors(weight: torch.Tensor, signature: InitSignature) -> Factors:
    """Semantics: W' - W = D C for the reference's GOAT init. weight: [d_out, d_in]. Returns
    float32 C [r, d_in] and D [d_out, r]; the SVD runs in float64 so factors do not depend on
    the weight's dtype beyond its values."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    sel = selected_indices(s.shape[0], signature)
    c = vh[sel]
    d = -(signature.init_cof / RHO) * u[:, sel] * s[sel]
    return c.float().contiguous(), d.float().contiguous()


def most_common_signature(adapters: Iterable[tuple[InitSignature | None, frozenset[str]]]
                          ) -> tuple[InitSignature, frozenset[str], int] | None:
    """The init signature shared by the most GOAT adapters among `adapters` (each as
    `format.read_signature` gives it: signature, modules; the first seen wins a tie), the
    modules those adapters target, and their count; None without GOAT adapters: what `merge`
    folds in when a server merges static components."""
    counts: dict[InitSignature, tuple[int, frozenset[str]]] = {}
    for signature, adapted in adapters:
        if signature is not None:
            count, modules = counts.get(signature, (0, frozenset()))
            counts[signature] = (count + 1, modules | adapted)
    if not counts:
        return None
    signature, (count, modules) = max(counts.items(), key=lambda kv: kv[1][0])
    return signature, modules, count


def covered_modules(merged: InitSignature | None, merged_modules: frozenset[str],
                    adapter: Adapter | None) -> frozenset[str]:
    """The modules where `adapter`'s own static term is the merged one (`merged` folded into
    `merged_modules`): there it needs no static term and must not be undone. That is the merged
    modules the adapter targets, for an adapter of the merged signature; nothing otherwise
    (the base, LoRA, other signatures). Its targets outside the merge still need their own."""
    if adapter is None or merged is None or adapter.signature != merged:
        return frozenset()
    return merged_modules & frozenset(adapter.layers)


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """A digest of the named weights' values (dtype and shape included)."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(weights):
        w = weights[name].detach().cpu().contiguous()
        h.update(f"{name}:{w.dtype}:{tuple(w.shape)};".encode())
        h.update(w.view(torch.uint8).numpy().data)
    return h.hexdigest()


class StaticComponents:
    """The static residual factors of a base model's Linear weights, per init signature.

    weights: module name -> the base weight [d_out, d_in] as the model holds it (a view into a
      fused weight is fine); `merge` adds into these tensors in place.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], cache_dir: Path | None = None):
        self.weights = weights
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.digest = weights_digest(weights)  # of the unmerged weights: the cache key
        self.svd_runs = 0
        self.merged: InitSignature | None = None
        self.merged_modules: frozenset[str] = frozenset()
        self._memory: dict[InitSignature, dict[str, Factors]] = {}

    def _cache_file(self, signature: InitSignature) -> Path:
        return self.cache_dir / f"{self.digest[:24]}-{signature.slug()}.safetensors"

    def factors(self, signature: InitSignature, modules: Iterable[str]) -> dict[str, Factors]:
        """The residual factors of `signature` on `modules`, from memory, the disk cache, or an
        SVD of the original (unmerged) weights, in that order."""
        modules = list(modules)
        known = self._memory.setdefault(signature, {})
        missing = [m for m in modules if m not in known]
        if missing:
            known.update(self._read_cache(signature, missing))
            missing = [m for m in modules if m not in known]
        if missing:
            for module in missing:
                known[module] = residual_factors(self.original_weight(module), signature)
                self.svd_runs += 1
            self._write_cache(signature, known)
        return {m: known[m] for m in modules}

    def original_weight(self, module: str) -> torch.Tensor:
        weight = self.weights[module].float()
        if self.merged is not None and module in self.merged_modules:
            c, d = self._memory[self.merged][module]
            weight = weight - d.to(weight.device) @ c.to(weight.device)
        return weight

    def merge(self, signature: InitSignature, modules: Iterable[str]) -> None:
        """Fold `signature`'s residual into the base weights of `modules`, once."""
        if self.merged is not None:
            raise RuntimeError(f"static components of {self.merged} are merged already")
        modules = list(modules)
        for module, (c, d) in self.factors(signature, modules).items():
            weight = self.weights[module]
            weight += (d.to(weight.device) @ c.to(weight.device)).to(weight.dtype)
        self.merged, self.merged_modules = signature, frozenset(modules)

    def static_terms(self, adapter: Adapter | None) -> dict[str, Factors]:
        """Per module, the low-rank term a request of `adapter` (None: the base) needs on top of
        the served weights: its own residual where its signature is not the merged one, minus
        the merged residual where it must not apply. Modules that need nothing are absent."""
        own = {}
        if adapter is not None and adapter.signature is not None:
            own = self.factors(adapter.signature, adapter.layers)
        terms: dict[str, Factors] = {}
        merged_factors = self._memory.get(self.merged, {}) if self.merged else {}
        covered = covered_modules(self.merged, self.merged_modules, adapter)
        for module in sorted((set(own) | self.merged_modules) - covered):
            parts = []
            if module in own:
                parts.append(own[module])
            if module in self.merged_modules:
                c, d = merged_factors[module]
                parts.append((c, -d))
            if parts:
                terms[module] = (torch.cat([c for c, _ in parts]),
                                 torch.cat([d for _, d in parts], dim=1))
        return terms

    def _read_cache(self, signature: InitSignature, modules: list[str]) -> dict[str, Factors]:
        cache_file = self._cache_file(signature)
        if not cache_file.is_file():
            return {}
        try:
            stored = load_file(str(cache_file))
        except (SafetensorError, OSError) as exc:
            logger.warning("ignoring unreadable static cache %s: %s", cache_file, exc)
            return {}
        return {m: (stored[f"{m}.static_a"], stored[f"{m}.static_b"])
                for m in modules if f"{m}.static_a" in stored and f"{m}.static_b" in stored}

    def _write_cache(self, signature: InitSignature, known: dict[str, Factors]) -> None:
        tensors = {}
        for module, (c, d) in known.items():
            tensors[f"{module}.static_a"] = c.cpu().contiguous()
            tensors[f"{module}.static_b"] = d.cpu().contiguous()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a reader never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
            os.close(fd)
            save_file(tensors, tmp, metadata={"signature": signature.slug(),
                                              "weights_digest": self.digest})
            os.replace(tmp, self._cache_file(signature))
        except OSError as exc:  # a read-only cache costs an SVD next time, nothing more
            logger.warning("could not write static cache in %s: %s", self.cache_dir, exc)
