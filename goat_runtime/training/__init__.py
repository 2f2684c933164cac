"""Applications of the adapter library: GOAT training (`trainer`, `train`) and the synthetic
demo tasks with their engine-served evaluation (`tasks`). Nothing in goat_runtime imports this."""
