"""Hook (b): vLLM's linear LoRA layers with the GOAT gate between shrink and expand.

Each stock class in `vllm.lora.utils._all_lora_classes` that wraps a linear layer is replaced by
a subclass that overrides `_apply_lora_to_output`: shrink every token with its slot's stacked
matrix, gate the rows (top-k of the router rows for GOAT slots, all ones for plain LoRA), then
expand. Plain LoRA slots go through the same path, so they share its fixes:

- tokens of no adapter (slot -1) get no delta. vLLM 0.32's CPU ops index the weights with -1,
  i.e. the last slot, so with max_loras=1 a base request batched with an adapter request got
  that adapter; here such tokens are skipped (on CUDA the punica kernels skip them already).
- row-parallel layers (o_proj, down_proj) see partial sums of the shrink under tensor
  parallelism: the router logits are all-reduced on a copy before the gate. The value rows stay
  partial; the layer's own all-reduce of its output sums them after the (linear) expand.
"""

import torch

from goat_runtime.vllm_plugin.gate import gate_rows


class GoatLinearMixin:
    """Mixed into a stock vLLM linear LoRA class (before it in the MRO)."""

    goat_row_parallel = False

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        # Per slot and slice: (E, k, rank_e); the extra last row (all zero) is what slot -1
        # indexes, so tokens without an adapter read "no router".
        self.goat_meta = torch.zeros(max_loras + 1, self.n_slices, 3, dtype=torch.long,
                                     device=self.device)
        self.goat_slots: set[int] = set()
        self.goat_num_experts = [0] * (max_loras + 1)  # max E over slices, host-side: no sync
        # Per slot: the shrink rows the adapter uses (<= max_lora_rank; the rest are zero). The
        # CPU path multiplies only these: a GOAT slot uses E + r + r_c rows (24 for r = E = 8),
        # which vLLM's allowed ranks round up to 32.
        self.goat_rows = [self.lora_a_stacked[0].shape[2]] * max_loras
        self.goat_views: list = [None] * max_loras

    def set_lora(self, index, lora_a, lora_b) -> None:
        super().set_lora(index, lora_a, lora_b)
        parts = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a]
        rows = [t.shape[0] for t in parts if t is not None]
        n = self.goat_rows[index] = min(max(rows, default=0), self.lora_a_stacked[0].shape[2])
        # Transposed views of the slot's used rows (the stacked buffers are written in place,
        # so views stay valid): slicing them per call is a large share of the CPU path's time.
        self.goat_views[index] = (
            [a[index, 0, :n].t() for a in self.lora_a_stacked],
            [b[index, 0, :, :n].t() for b in self.lora_b_stacked])

    def set_goat_meta(self, index: int, meta: list[tuple[int, int, int]]) -> None:
        self.goat_meta[index] = torch.tensor(meta, dtype=torch.long)
        self.goat_num_experts[index] = max((e for e, _, _ in meta), default=0)
        if any(e for e, _, _ in meta):
            self.goat_slots.add(index)
        else:
            self.goat_slots.discard(index)

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        if hasattr(self, "goat_meta"):
            self.goat_meta[index] = 0
            self.goat_num_experts[index] = 0
            self.goat_slots.discard(index)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        original_shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:
            output = output.flatten(0, 1)
            x = x.flatten(0, 1)
        slots = self.punica_wrapper.token_lora_indices
        if x.is_cuda:
            # vLLM's kernels skip slot -1 on CUDA and are fused; reuse them for both halves.
            num_rows = self.lora_b_stacked[0].shape[-1]
            h = torch.zeros(self.n_slices, x.shape[0], num_rows, dtype=torch.float32,
                            device=x.device)
            self.punica_wrapper.add_shrink(h, x, self.lora_a_stacked, 1.0)
            if self.goat_slots:
                self._goat_gate(h, self.goat_meta[slots], max(self.goat_num_experts))
            self.punica_wrapper.add_expand(output, h, self.lora_b_stacked, self.output_slices,
                                           offset_start=0, add_inputs=True)
        else:
            self._apply_cpu(x, output, slots)
        if original_shape is not None:
            output = output.reshape(original_shape)
        return output

    def _apply_cpu(self, x: torch.Tensor, output: torch.Tensor, slots: torch.Tensor) -> None:
        """Shrink, gate and expand with the tokens sorted by slot (each slot's tokens one
        contiguous block, so its matmuls read and write views, not gathered copies), over
        only the rows each slot uses; tokens of slot -1 are left alone. Every branch depends
        only on the batch's adapters, which all TP ranks share (their slot numbers differ)."""
        slot_list = slots.tolist()
        counts: dict[int, int] = {}
        for s in slot_list:
            if s >= 0:
                counts[s] = counts.get(s, 0) + 1
        if not counts:
            return
        order = torch.argsort(slots, stable=True)[len(slot_list) - sum(counts.values()):]
        groups, start = [], 0
        for s in sorted(counts):  # a slot never set (no views) adds nothing
            n = self.goat_rows[s] if self.goat_views[s] is not None else 0
            groups.append((s, start, start + counts[s], n))
            start += counts[s]
        num_rows = max(g[3] for g in groups)
        if num_rows == 0:
            return
        xs = x.index_select(0, order)
        if xs.dtype != torch.float32:
            xs = xs.float()
        h = torch.zeros(self.n_slices, xs.shape[0], num_rows, dtype=torch.float32,
                        device=x.device)
        for s, lo, hi, n in groups:
            if n == 0:
                continue
            xg = xs[lo:hi]
            for i, a_t in enumerate(self.goat_views[s][0]):
                torch.matmul(xg, a_t if a_t.dtype == torch.float32 else a_t.float(),
                             out=h[i, lo:hi, :n])
        goat = [s for s in counts if s in self.goat_slots]
        if goat:
            e_max = max(self.goat_num_experts[s] for s in goat)
            self._goat_gate(h, self.goat_meta[slots.index_select(0, order)], e_max,
                            order=order, num_tokens=len(slot_list))
        delta = torch.zeros(xs.shape[0], output.shape[1], dtype=torch.float32, device=x.device)
        for s, lo, hi, n in groups:
            if n == 0:
                continue
            offset = 0
            for i, (width, b_t) in enumerate(zip(self.output_slices, self.goat_views[s][1],
                                                 strict=True)):
                torch.matmul(h[i, lo:hi, :n], b_t if b_t.dtype == torch.float32 else b_t.float(),
                             out=delta[lo:hi, offset:offset + width])
                offset += width
        output.index_add_(0, order, delta.to(output.dtype))

    def _goat_gate(self, h: torch.Tensor, meta: torch.Tensor, e_max: int, *,
                   order: torch.Tensor | None = None, num_tokens: int = 0) -> None:
        """h [n_slices, T, R] *= the gate of each token's slot (meta [T, n_slices, 3]: the
        tokens' slot metadata), in place, all slices in one gate call. Must run on every
        tensor-parallel rank alike (it may all-reduce): callers decide by the batch's
        adapters. h's tokens are the batch's `order` (slot-sorted) when given: slot numbers
        differ between ranks (each worker's manager assigns its own), so the router logits are
        all-reduced in the batch's own token order (num_tokens), never in slot order."""
        if e_max == 0:
            return
        n_slices, rows_t, num_rows = h.shape
        logits = h[:, :, :e_max].clone()  # a copy: the shared buffer must stay partial
        if self.goat_row_parallel and self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            if order is None:
                logits = tensor_model_parallel_all_reduce(logits)
            else:
                batch = logits.new_zeros(n_slices, num_tokens, e_max)
                batch[:, order] = logits
                logits = tensor_model_parallel_all_reduce(batch)[:, order]
        gate = gate_rows(logits.reshape(n_slices * rows_t, e_max),
                         meta.transpose(0, 1).reshape(n_slices * rows_t, 3), num_rows)
        h *= gate.view(n_slices, rows_t, num_rows)


class GoatLogitsMixin:
    """Mixed into vLLM's LogitsProcessorWithLoRA: GOAT and most LoRA adapters leave lm_head
    alone, so the lm_head delta is skipped unless a slot holds lm_head weights. vLLM 0.32 on the
    CPU crashes in `add_lora_logits` when prompt logprobs of two or more requests are computed
    in one step (the logits have one row per prompt token, its indices one per request)."""

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        self.goat_lm_head_slots: set[int] = set()

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        if hasattr(self, "goat_lm_head_slots"):
            self.goat_lm_head_slots.discard(index)

    def set_lora(self, index, lora_a, lora_b) -> None:
        super().set_lora(index, lora_a, lora_b)
        # vLLM's warm-up loads all-zero dummy adapters into the slots (and may leave them
        # there): only a nonzero delta counts.
        if bool(lora_b.any()) and bool(lora_a.any()):
            self.goat_lm_head_slots.add(index)
        else:
            self.goat_lm_head_slots.discard(index)

    def _get_logits(self, hidden_states, lm_head, embedding_bias=None, skip_gather=False):
        if not self.goat_lm_head_slots:
            actual = lm_head.base_layer if hasattr(lm_head, "base_layer") else lm_head
            return self.base_layer._get_logits(hidden_states, actual, embedding_bias,
                                               skip_gather)
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
