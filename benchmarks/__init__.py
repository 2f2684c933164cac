"""In-process benchmarks of goat-serve's op, model and engine, and the device check of a lent
GPU machine (see docs/benchmarks.md and docs/gpu.md). Run each from the repository root as a
module, e.g. `python -m benchmarks.bench_engine --help`; random_model holds the SmolLM2-shaped
model and the adapters they, and loadtests/, run on."""
