"""The engine: per-step context, paged KV cache (later: scheduler, runner, step loop)."""
