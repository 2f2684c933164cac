"""Hook (b): vLLM's linear LoRA layers with the GOAT gate between shrink and expand.

Each stock class in `vllm.lora.utils._all_lora_classes` that wraps a linear layer is replaced by
a subclass that overrides `_apply_lora_to_output`: shrink every token with its slot's stacked
matrix, gate the rows (top-k of the router rows for GOAT slots, all ones for plain LoRA), then
expand. Plain LoRA slots go through the same path, so they share its fixes. Two ways:

- on the CPU, goat-serve's fused kernel (`goat_runtime.ops.add_routed_lora`, the engine's own
  op) in one call per layer. It needs the slots in its layout, so each layer keeps a copy of
  vLLM's stacked buffers in that layout, rewritten whenever vLLM fills a slot. Tokens of no
  adapter (slot -1) get no delta: vLLM 0.32's CPU ops index the weights with -1, i.e. the last
  slot, so with max_loras=1 a base request batched with an adapter request got that adapter.
- elsewhere (CUDA, and row-parallel layers under tensor parallelism on the CPU), vLLM's punica
  shrink and expand with the gate (`goat_runtime.ops.gate`) between them. Row-parallel layers
  (o_proj, down_proj) see partial sums under tensor parallelism: the router logits are
  all-reduced before the gate. The value rows stay partial; the layer's own
  all-reduce of its output sums them after the (linear) expand. On the CPU the rows of slot -1
  tokens are zeroed before the expand.

Routers are float32 whatever the served dtype, as in goat-serve's engine (a bfloat16 router
moves the logits by its rounding and can flip a top-k choice): the router rows also ride in
vLLM's stacked shrink (in vLLM's LoRA dtype, gated to 0 there), but each layer keeps its own
float32 stack of them, written by the activate hook from the adapter's float32 routers
(`loader.py`), and both paths compute the logits from it: the fused kernel's float32 router
slots, or x @ router^T in float32 on the punica path.

When static components are merged into the base weights (`merge.py`), the tokens whose slot
does not carry the merged term get it subtracted again, as one low-rank term per layer.
"""

from typing import TYPE_CHECKING, Any

import torch

from goat_runtime.adapters.slots import allocate_slots, clear_slot, write_slice
from goat_runtime.ops import RoutedLoRAWeights, add_routed_lora
from goat_runtime.ops.gate import gate_rows


def require_cpu_kernel() -> None:
    try:
        from goat_runtime import _C  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"goat vLLM plugin: on the CPU the GOAT layers run goat-serve's C++ kernel "
            f"(goat_runtime._C), which does not load here ({e}); build it against this "
            f"environment's torch (`pip install --no-build-isolation -e .` in the checkout, or "
            f"`pip install goat-serve[vllm]`)") from e


if TYPE_CHECKING:
    # What the stock vLLM LoRA classes the mixins go into provide, as vLLM 0.32 declares it
    # (vllm is untyped here), so that mypy checks the mixins' use of it and their super()
    # calls. At run time the mixins' base is `object`: the vLLM class follows them in the MRO.
    class _VllmLoRALayer:
        base_layer: Any
        punica_wrapper: Any  # vLLM's PunicaWrapperBase: the batch's token -> slot mapping

        def create_lora_weights(self, max_loras: int, lora_config: Any,
                                model_config: Any = None) -> None: ...

        def reset_lora(self, index: int) -> None: ...

    class _VllmLinearLoRA(_VllmLoRALayer):
        n_slices: int
        device: torch.device
        tp_size: int
        output_slices: tuple[int, ...]
        lora_a_stacked: tuple[torch.Tensor, ...]  # per slice [max_loras, 1, rank, d_in]
        lora_b_stacked: tuple[torch.Tensor, ...]  # per slice [max_loras, 1, d_out, rank]

        # lora_a/lora_b: one tensor, or one per slice (None where a sub-module is not adapted)
        def set_lora(self, index: int, lora_a: torch.Tensor | list[torch.Tensor | None],
                     lora_b: torch.Tensor | list[torch.Tensor | None]) -> None: ...

        def slice_lora_a(self, lora_a: torch.Tensor) -> torch.Tensor: ...

    class _VllmLogitsLoRA(_VllmLoRALayer):
        lora_a_stacked: torch.Tensor  # [max_loras, 1, rank, hidden]
        lora_b_stacked: torch.Tensor  # [max_loras, 1, vocab, rank]

        def set_lora(self, index: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None: ...

        def _get_logits(self, hidden_states: torch.Tensor, lm_head: Any,
                        embedding_bias: torch.Tensor | None = None,
                        skip_gather: bool = False) -> torch.Tensor | None: ...
else:
    _VllmLinearLoRA = _VllmLogitsLoRA = object


class GoatLinearMixin(_VllmLinearLoRA):
    """Mixed into a stock vLLM linear LoRA class (before it in the MRO)."""

    goat_row_parallel = False

    def create_lora_weights(self, max_loras: int, lora_config: Any,
                            model_config: Any = None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        # Per slot and slice: (E, k, rank_e); the extra last row (all zero) is what slot -1
        # indexes, so tokens without an adapter read "no router".
        self.goat_meta = torch.zeros(max_loras + 1, self.n_slices, 3, dtype=torch.long,
                                     device=self.device)
        self.goat_slots: set[int] = set()
        # Per slot and slice: the static term merged into the base weights (merge.py) is the
        # slot's own, so its tokens are not undone there; the last row (slot -1) stays False.
        self.goat_covered = torch.zeros(max_loras + 1, self.n_slices, dtype=torch.bool,
                                        device=self.device)
        self.goat_num_experts = [0] * (max_loras + 1)  # max E over slices, host-side: no sync
        # Per slice and slot: the float32 router rows [E_max, d_in of this rank], grown to the
        # largest E so far; the last slot (what slot -1 indexes) stays zero.
        self.goat_router = torch.zeros(self.n_slices, max_loras + 1, 0,
                                       self.lora_a_stacked[0].shape[3], dtype=torch.float32,
                                       device=self.lora_a_stacked[0].device)
        # Per slot and slice: the shrink rows the adapter uses (<= max_lora_rank).
        self.goat_rows = [[0] * self.n_slices for _ in range(max_loras)]
        self.goat_fused = self.lora_a_stacked[0].device.type == "cpu" and not (
            self.goat_row_parallel and self.tp_size > 1)
        if self.goat_fused:
            require_cpu_kernel()
        # The fused kernel's copy of the slots, sized to the largest adapter set so far (the
        # kernel reads every value row of a slice); slots filled by set_lora whose GOAT
        # metadata has not come yet are `goat_unwritten`.
        self.goat_routed: RoutedLoRAWeights | None = None
        self.goat_written: set[int] = set()
        self.goat_unwritten: set[int] = set()

    def set_lora(self, index: int, lora_a: torch.Tensor | list[torch.Tensor | None],
                 lora_b: torch.Tensor | list[torch.Tensor | None]) -> None:
        super().set_lora(index, lora_a, lora_b)
        parts = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a]
        max_rows = self.lora_a_stacked[0].shape[2]
        rows = [0 if t is None else min(t.shape[0], max_rows) for t in parts]
        if len(rows) != self.n_slices:  # vLLM expands packed groups that do not match
            rows = [max(rows, default=0)] * self.n_slices
        self.goat_rows[index] = rows
        self.goat_unwritten.add(index)

    def set_goat_meta(self, index: int, meta: list[tuple[int, int, int]],
                      covered: list[bool] | None = None,
                      routers: list[torch.Tensor | None] | None = None) -> None:
        """Called by the activate hook right after vLLM filled slot `index` (set_lora), per
        slice: meta (E, k, rank_e); covered, whether the slot's static term is the one merged
        into the base; routers, the float32 router [E, d_in] (unsharded: this layer cuts it as
        vLLM cuts lora_a), None where E = 0."""
        routers = routers or [None] * self.n_slices
        self._set_routers(index, [e for e, _, _ in meta], routers)
        self.goat_meta[index] = torch.tensor(meta, dtype=torch.long)
        self.goat_covered[index] = torch.tensor(covered or [False] * self.n_slices)
        self.goat_num_experts[index] = max((e for e, _, _ in meta), default=0)
        if any(e for e, _, _ in meta):
            self.goat_slots.add(index)
        else:
            self.goat_slots.discard(index)
        if self.goat_fused:
            self._write_routed(index)
        self.goat_unwritten.discard(index)

    def _set_routers(self, index: int, experts: list[int],
                     routers: list[torch.Tensor | None]) -> None:
        for s, (num_experts, router) in enumerate(zip(experts, routers, strict=True)):
            if num_experts and (router is None or router.shape[0] != num_experts):
                raise RuntimeError(
                    f"goat vLLM plugin: slot {index} slice {s} routes {num_experts} experts but "
                    f"got router {None if router is None else tuple(router.shape)}")
        if max(experts, default=0) > self.goat_router.shape[2]:
            grown = self.goat_router.new_zeros(self.n_slices, self.goat_router.shape[1],
                                               max(experts), self.goat_router.shape[3])
            grown[:, :, : self.goat_router.shape[2]] = self.goat_router
            self.goat_router = grown
        self.goat_router[:, index] = 0.0
        for s, router in enumerate(routers):
            if router is None:
                continue
            if self.goat_row_parallel and self.tp_size > 1:
                router = self.slice_lora_a(router)  # this rank's columns, as vLLM's lora_a
            # float32 from the adapter's own router: never through the served dtype
            self.goat_router[s, index, : router.shape[0]] = router.to(torch.float32)

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        if hasattr(self, "goat_meta"):
            self.goat_meta[index] = 0
            self.goat_router[:, index] = 0.0
            self.goat_covered[index] = False
            self.goat_num_experts[index] = 0
            self.goat_slots.discard(index)
            self.goat_rows[index] = [0] * self.n_slices
            self.goat_unwritten.discard(index)
            self.goat_written.discard(index)
            if self.goat_routed is not None:
                clear_slot(self.goat_routed, index)

    def _write_routed(self, index: int) -> None:
        """Copy slot `index` from vLLM's stacked buffers into the fused kernel's layout,
        regrowing the copy (and rewriting its slots) if the slot needs more rows."""
        experts = [int(e) for e in self.goat_meta[index, :, 0].tolist()]
        value_rows = max(r - e for r, e in zip(self.goat_rows[index], experts, strict=True))
        routed = self.goat_routed
        if (routed is None or value_rows > routed.num_value_rows
                or max(experts) > routed.max_experts):
            old_rows = routed.num_value_rows if routed is not None else 1
            old_experts = routed.max_experts if routed is not None else 0
            routed = self.goat_routed = allocate_slots(
                self.lora_a_stacked[0].shape[0], self.output_slices,
                self.lora_a_stacked[0].shape[3], value_rows=max(old_rows, value_rows),
                max_experts=max(old_experts, max(experts)), dtype=self.lora_a_stacked[0].dtype,
                device=self.lora_a_stacked[0].device)
            for other in self.goat_written - {index}:
                self._write_slot(routed, other)
        self._write_slot(routed, index)
        self.goat_written.add(index)

    def _write_slot(self, routed: RoutedLoRAWeights, index: int) -> None:
        clear_slot(routed, index)
        for s, (a_stacked, b_stacked) in enumerate(zip(self.lora_a_stacked,
                                                       self.lora_b_stacked, strict=True)):
            rows = self.goat_rows[index][s]
            num_experts, top_k, expert_rank = (int(v) for v in self.goat_meta[index, s])
            if rows == 0:
                continue
            a, b = a_stacked[index, 0, :rows], b_stacked[index, 0, :, :rows]
            router = self.goat_router[s, index, :num_experts] if num_experts else None
            write_slice(routed, index, s, [(a[num_experts:], b[:, num_experts:])],
                        router, top_k, expert_rank)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        original_shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:
            output = output.flatten(0, 1)
            x = x.flatten(0, 1)
        slots = self.punica_wrapper.token_lora_indices
        if self.goat_fused:
            self._apply_fused(x, output, slots)
        else:
            num_rows = self.lora_b_stacked[0].shape[-1]
            h = torch.zeros(self.n_slices, x.shape[0], num_rows, dtype=torch.float32,
                            device=x.device)
            self.punica_wrapper.add_shrink(h, x, self.lora_a_stacked, 1.0)
            if not x.is_cuda:  # vLLM's CPU ops gave slot -1 the last slot's rows
                h[:, slots[: x.shape[0]] < 0] = 0.0
            if self.goat_slots:
                self._goat_gate(h, x, slots[: x.shape[0]], max(self.goat_num_experts))
            self.punica_wrapper.add_expand(output, h, self.lora_b_stacked, self.output_slices,
                                           offset_start=0, add_inputs=True)
        undo = getattr(self.base_layer, "goat_undo", None)
        if undo is not None:
            self._undo_merged(x, output, slots, *undo)
        if original_shape is not None:
            output = output.reshape(original_shape)
        return output

    def _apply_fused(self, x: torch.Tensor, output: torch.Tensor, slots: torch.Tensor) -> None:
        if self.goat_unwritten:
            raise RuntimeError(
                f"goat vLLM plugin: slots {sorted(self.goat_unwritten)} were filled without "
                f"their GOAT metadata (the activate_adapter hook did not run)")
        if self.goat_routed is None or x.shape[0] == 0:
            return
        token_slots = torch.full((x.shape[0],), -1, dtype=torch.int32)
        token_slots[: slots.shape[0]] = slots[: x.shape[0]]
        y = output if output.is_contiguous() else output.contiguous()
        add_routed_lora(y, x.contiguous(), token_slots, self.goat_routed)
        if y is not output:
            output.copy_(y)

    def _undo_merged(self, x: torch.Tensor, output: torch.Tensor, slots: torch.Tensor,
                     c: torch.Tensor, d: torch.Tensor, row_slice: torch.Tensor) -> None:
        """output -= (x C^T * need) D^T for the tokens whose slot does not cover the merged
        static term (merge.py): c [R, d_in] and d [d_out, R] this rank's shards, row_slice [R]
        the slice of each row, need [T, R] whether the token's slot leaves that slice undone.
        Row-parallel layers under tensor parallelism get partial sums, which the layer's
        all-reduce adds up like the rest of its output."""
        need = ~self.goat_covered[slots[: x.shape[0]].long()][:, row_slice]
        tokens = need.any(dim=1).nonzero().squeeze(1)
        if tokens.numel() == 0:
            return
        h = (x[tokens] @ c.t()) * need[tokens]
        output.index_add_(0, tokens, h @ d.t(), alpha=-1.0)

    def _goat_gate(self, h: torch.Tensor, x: torch.Tensor, slots: torch.Tensor,
                   e_max: int) -> None:
        """h [n_slices, T, R] *= the gate of each token's slot (slots [T], -1: none), in
        place, all slices in one gate call, from float32 router logits (the layer's float32
        router stack times x, never the rounded router rows in h). Must run on every
        tensor-parallel rank alike (it may all-reduce): the batch's adapters decide, which all
        ranks share."""
        if e_max == 0:
            return
        n_slices, num_tokens, num_rows = h.shape
        routers = self.goat_router[:, :, :e_max]  # [n_slices, slots + 1, E, d_in]
        num_slots = routers.shape[1]
        # Every slot's logits for every token (slots x E columns, as small as a LoRA shrink),
        # then each token's own slot; slot -1 reads the last, all-zero, slot.
        stacked = routers.reshape(n_slices, num_slots * e_max, x.shape[1])
        logits = torch.matmul(x.float(), stacked.transpose(1, 2))
        own = torch.where(slots < 0, num_slots - 1, slots).long()
        logits = logits.view(n_slices, num_tokens, num_slots, e_max)[
            :, torch.arange(num_tokens, device=x.device), own]
        meta = self.goat_meta[own]  # [T, n_slices, 3]
        if self.goat_row_parallel and self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            logits = tensor_model_parallel_all_reduce(logits)
        gate = gate_rows(logits.reshape(n_slices * num_tokens, e_max),
                         meta.transpose(0, 1).reshape(n_slices * num_tokens, 3), num_rows)
        h *= gate.view(n_slices, num_tokens, num_rows)


class GoatLogitsMixin(_VllmLogitsLoRA):
    """Mixed into vLLM's LogitsProcessorWithLoRA: GOAT and most LoRA adapters leave lm_head
    alone, so the lm_head delta is skipped unless a slot holds lm_head weights. vLLM 0.32 on the
    CPU crashes in `add_lora_logits` when prompt logprobs of two or more requests are computed
    in one step (the logits have one row per prompt token, its indices one per request)."""

    def create_lora_weights(self, max_loras: int, lora_config: Any,
                            model_config: Any = None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        self.goat_lm_head_slots: set[int] = set()

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        if hasattr(self, "goat_lm_head_slots"):
            self.goat_lm_head_slots.discard(index)

    def set_lora(self, index: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().set_lora(index, lora_a, lora_b)
        # vLLM's warm-up loads all-zero dummy adapters into the slots (and may leave them
        # there): only a nonzero delta counts.
        if bool(lora_b.any()) and bool(lora_a.any()):
            self.goat_lm_head_slots.add(index)
        else:
            self.goat_lm_head_slots.discard(index)

    def _get_logits(self, hidden_states: torch.Tensor, lm_head: Any,
                    embedding_bias: torch.Tensor | None = None,
                    skip_gather: bool = False) -> torch.Tensor | None:
        if not self.goat_lm_head_slots:
            actual = lm_head.base_layer if hasattr(lm_head, "base_layer") else lm_head
            base_logits: torch.Tensor | None = self.base_layer._get_logits(
                hidden_states, actual, embedding_bias, skip_gather)
            return base_logits
        rows = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
        requests = self.punica_wrapper.sampler_indices.shape[0]
        if rows != requests:
            raise NotImplementedError(
                "goat vLLM plugin: prompt logprobs (or any logits of more than one position "
                "per request) with an adapter that adapts lm_head are not supported")
        logits = super()._get_logits(hidden_states, lm_head, embedding_bias, skip_gather)
        indices = self.punica_wrapper.sampler_indices
        last = self.lora_a_stacked.shape[0] - 1
        if logits is None or hidden_states.is_cuda or last not in self.goat_lm_head_slots:
            return logits
        # vLLM's CPU op gave the rows of slot -1 the last slot's delta: take it back.
        wrong = (indices < 0).nonzero().squeeze(1)
        if wrong.numel():
            a = self.lora_a_stacked[last, 0].float()
            b = self.lora_b_stacked[last, 0].float()
            delta = (hidden_states.reshape(rows, -1)[wrong].float() @ a.t()) @ b.t()
            logits[wrong] -= delta[:, : logits.shape[1]].to(logits.dtype)
        return logits
