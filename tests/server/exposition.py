"""What promtool's `check metrics` rejects in an exposition, checked without promtool (not
installed here): prometheus-client's own parser must read it, and no metric family, HELP or TYPE
line, or sample (name and labels) may appear twice. Shared by the native and the vLLM tests."""

from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset], float]


def parse_exposition(text: str) -> tuple[Samples, dict[str, str]]:
    """(sample (name, labels) -> value, family name -> type); AssertionError on a duplicate."""
    for kind in ("# HELP ", "# TYPE "):
        names = Counter(line.split()[2] for line in text.splitlines() if line.startswith(kind))
        duplicated = sorted(n for n, c in names.items() if c > 1)
        assert not duplicated, f"{kind.strip()} repeated for {duplicated}"
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in types, f"family {family.name} appears twice"
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"sample {key} appears twice"
            samples[key] = s.value
    return samples, types
