# Types of the C++ extension goat_runtime._C (goat_runtime/ops/cpu/*.cpp, pybind11), for the type
# checker. Keep in step with the m.def calls in those files; the ops' docstrings are the reference.
import torch

def add_routed_lora(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
                    shrink: torch.Tensor, router: torch.Tensor, expand: torch.Tensor,
                    slice_meta: torch.Tensor, out_offsets: list[int],
                    expert_counts: torch.Tensor | None = None) -> None: ...
def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int = 0) -> torch.Tensor: ...
