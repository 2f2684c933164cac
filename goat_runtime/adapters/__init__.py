"""The adapter library: checkpoint formats, GOAT's static term, device slots and writers.

Imports nothing above `goat_runtime.model` (the import contracts in pyproject.toml)."""
