// goat_runtime._C: the CPU kernels, built at install against the installed torch.

#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels of goat-serve: the routed low-rank op and paged decode attention";
  goat_cpu::register_routed_lora(m);
  goat_cpu::register_paged_attention(m);
}
