"""The engine: requests, scheduling, KV block allocation, adapter slots, sampling and the step
loop (`LLMEngine`), run on its own thread by `AsyncEngine`. It drives `goat_runtime.model` and
imports nothing from `server/`."""
