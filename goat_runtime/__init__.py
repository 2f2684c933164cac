"""goat_runtime: adapter formats, routed low-rank kernels, model executor, KV cache, engine."""
