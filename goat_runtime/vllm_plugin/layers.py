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

    def set_goat_meta(self, index: int, meta: list[tuple[int, int, int]]) -> None:
        self.goat_meta[index] = torch.tensor(meta, dtype=torch.long)
        if any(e for e, _, _ in meta):
            self.goat_slots.add(index)
        else:
            self.goat_slots.discard(index)

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        if hasattr(self, "goat_meta"):
            self.goat_meta[index] = 0
            self.goat_slots.discard(index)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        original_shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:
            output = output.flatten(0, 1)
            x = x.flatten(0, 1)
        slots = self.punica_wrapper.token_lora_indices
        num_rows = self.lora_b_stacked[0].shape[-1]
        if x.is_cuda:
            # vLLM's kernels skip slot -1 on CUDA and are fused; reuse them for both halves.
            h = torch.zeros(self.n_slices, x.shape[0], num_rows, dtype=torch.float32,
                            device=x.device)
            self.punica_wrapper.add_shrink(h, x, self.lora_a_stacked, 1.0)
            self._goat_gate(h, slots)
            self.punica_wrapper.add_expand(output, h, self.lora_b_stacked, self.output_slices,
                                           offset_start=0, add_inputs=True)
        else:
            self._apply_cpu(x, output, slots, num_rows)
        if original_shape is not None:
            output = output.reshape(original_shape)
        return output

    def _apply_cpu(self, x: torch.Tensor, output: torch.Tensor, slots: torch.Tensor,
                   num_rows: int) -> None:
        """Shrink, gate and expand grouped by slot; tokens of slot -1 are left alone."""
        slot_list = slots.tolist()
        present = sorted({s for s in slot_list if s >= 0})
        if not present:
            return
        groups = [(s, (slots == s).nonzero().squeeze(1)) for s in present]
        h = torch.zeros(self.n_slices, x.shape[0], num_rows, dtype=torch.float32,
                        device=x.device)
        xf = x.float()
        for i in range(self.n_slices):
            a = self.lora_a_stacked[i]
            for s, rows in groups:
                h[i, rows] = xf[rows] @ a[s, 0].float().t()
        self._goat_gate(h, slots)
        offset = 0
        for i, width in enumerate(self.output_slices):
            b = self.lora_b_stacked[i]
            out = output[:, offset:offset + width]
            for s, rows in groups:
                out[rows] += (h[i, rows] @ b[s, 0].float().t()).to(output.dtype)
            offset += width

    def _goat_gate(self, h: torch.Tensor, slots: torch.Tensor) -> None:
        """h [n_slices, T, R] *= the gate of each token's slot, in place. Must run on every
        tensor-parallel rank alike (it may all-reduce): its branches depend only on the batch's
        slots, which all ranks share."""
        if not self.goat_slots:
            return
        meta = self.goat_meta[slots]  # [T, n_slices, 3]; slot -1 -> the zero row
        e_max = int(self.goat_meta[..., 0].max())
        if e_max == 0:
            return
        logits = h[:, :, :e_max].clone()  # a copy: the shared buffer must stay partial
        if self.goat_row_parallel and self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            logits = tensor_model_parallel_all_reduce(logits)
        for i in range(self.n_slices):
            h[i] *= gate_rows(logits[i], meta[:, i], h.shape[-1])


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
