"""Load tests of goat-serve and other OpenAI-compatible servers over HTTP (see README.md): the
load generator (loadgen), and the scripts that start real servers and drive it (side_by_side,
churn, faults, soak, echo_memory). Run each from the repository root as a module, e.g.
`python -m loadtests.side_by_side --help`."""
