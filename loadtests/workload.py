"""What the load generator sends and when: arrivals, adapter choice, prompt and output lengths.

Everything here is pure and driven by an explicit `random.Random`, so a seed reproduces the same
request sequence whatever the server does, and the statistics can be tested without a clock.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

AdapterDist = Literal["uniform", "round-robin", "zipf"]
ADAPTER_DISTS: tuple[str, ...] = ("uniform", "round-robin", "zipf")

# Common English words that are one token each (with their leading space) in the usual BPE
# vocabularies (Llama, GPT-2, SmolLM), so a prompt of n words is roughly n prompt tokens.
_WORDS_TEXT = """
    the of and to in is was for on that with as by at from his her it an are were which be this
    has had not but they have one all their been there who more when will would other first new
    some what time about out can only into after two over many also its most years may before
    such so people three these any where made used state world under then well up between during
    city like back him them city long part three high both each work same game life group year
    four five six seven eight ten since day way while last good great small large old big man home
    house water river road town school music film book story name play team line land side power
    war army king church family father mother son wife show money number point place case head
    hand body light night word order form year week month area field force moon sun star sea
"""
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS_TEXT.split()))


@dataclass(frozen=True)
class LengthDist:
    """A distribution of lengths (prompt words or output tokens), always drawn as an int >= minimum.

    kind "fixed" uses `a`; "uniform" draws an integer in [a, b]; "normal" draws N(a, b) (mean,
    std), rounded and clamped at `minimum` so a wide normal never yields empty requests.
    """

    kind: Literal["fixed", "uniform", "normal"] = "fixed"
    a: float = 128
    b: float = 0
    minimum: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "normal"):
            raise ValueError(f"length kind must be fixed|uniform|normal, not {self.kind!r}")
        if self.minimum < 1:
            raise ValueError(f"length minimum must be >= 1, got {self.minimum}")
        if self.kind == "fixed" and self.a < self.minimum:
            raise ValueError(f"fixed length {self.a:g} is below the minimum {self.minimum}")
        if self.kind == "uniform" and not self.minimum <= self.a <= self.b:
            raise ValueError(
                f"uniform length needs {self.minimum} <= low <= high, got {self.a:g}:{self.b:g}"
            )
        if self.kind == "normal" and self.b < 0:
            raise ValueError(f"normal length needs std >= 0, got {self.b:g}")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """Parse `N`, `fixed:N`, `uniform:LO:HI` or `normal:MEAN:STD[:MIN]` (the CLI syntax)."""
        usage = f"bad length spec {text!r}: use N, fixed:N, uniform:LO:HI or normal:MEAN:STD[:MIN]"
        parts = text.strip().split(":")
        kind, args = (parts[0], parts[1:]) if parts[0].isalpha() else ("fixed", parts)
        arity = {"fixed": (1,), "uniform": (2,), "normal": (2, 3)}
        if kind not in arity or len(args) not in arity[kind]:
            raise ValueError(usage)
        try:
            nums = [float(arg) for arg in args]
        except ValueError:
            raise ValueError(usage) from None
        if kind == "fixed":
            return cls("fixed", int(nums[0]))
        if kind == "uniform":
            return cls("uniform", int(nums[0]), int(nums[1]))
        return cls("normal", nums[0], nums[1], int(nums[2]) if len(nums) == 3 else 1)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(self.minimum, round(rng.gauss(self.a, self.b)))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.a:g}"
        if self.kind == "uniform":
            return f"uniform:{self.a:g}:{self.b:g}"
        return f"normal:{self.a:g}:{self.b:g}:{self.minimum}"


def arrival_offsets(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Yield request send times in seconds from the start: 0 first, then gamma-distributed gaps.

    The gaps have mean 1/rate and shape `burstiness` (vLLM's benchmark_serving convention):
    1.0 is a Poisson process, < 1 is burstier, > 1 more regular. rate = inf sends all at once.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 req/s (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness (gamma shape) must be > 0, got {burstiness}")
    t = 0.0
    yield t
    if math.isinf(rate):
        yield from itertools.repeat(0.0)
    scale = 1.0 / (rate * burstiness)  # gamma mean = shape * scale = 1 / rate
    while True:
        t += rng.gammavariate(burstiness, scale)
        yield t


class AdapterChooser:
    """Picks the adapter (the request's `model`) for each request.

    Zipf ranks adapters in the order given: the first is the most popular, with probability
    proportional to 1 / rank**alpha (the skewed-popularity setup of S-LoRA; alpha=0 is uniform).
    """

    def __init__(
        self, models: Sequence[str], dist: AdapterDist, rng: random.Random, zipf_alpha: float = 1.0
    ) -> None:
        if not models:
            raise ValueError("at least one model (adapter) name is needed")
        if dist not in ADAPTER_DISTS:
            raise ValueError(f"adapter distribution must be one of {ADAPTER_DISTS}, not {dist!r}")
        if zipf_alpha < 0:
            raise ValueError(f"zipf alpha must be >= 0, got {zipf_alpha}")
        self.models = list(models)
        self.dist = dist
        self._rng = rng
        self._next = 0
        weights = [1.0 / (rank**zipf_alpha) for rank in range(1, len(self.models) + 1)]
        self._cum_weights = list(itertools.accumulate(weights))

    def probabilities(self) -> list[float]:
        """The chance of each adapter per request (round-robin: its long-run share)."""
        if self.dist != "zipf":
            return [1.0 / len(self.models)] * len(self.models)
        total = self._cum_weights[-1]
        prev = [0.0, *self._cum_weights[:-1]]
        return [(c - p) / total for c, p in zip(self._cum_weights, prev, strict=True)]

    def choose(self) -> str:
        if self.dist == "round-robin":
            model = self.models[self._next % len(self.models)]
            self._next += 1
            return model
        if self.dist == "uniform":
            return self._rng.choice(self.models)
        return self._rng.choices(self.models, cum_weights=self._cum_weights)[0]


def synth_prompt(num_words: int, rng: random.Random) -> str:
    """A prompt of random common words: about `num_words` tokens, and no shared prefix to cache."""
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


@dataclass(frozen=True)
class RequestSpec:
    """One request to send, decided before sending so it does not depend on server timing."""

    index: int
    adapter: str
    prompt: str
    prompt_words: int
    max_tokens: int


class Workload:
    """Draws request i's adapter, prompt and output length, in index order, from one seed.

    Separate random streams for adapters, lengths/prompts and arrivals mean that changing one
    setting (say the rate) leaves the other draws of a seeded run unchanged.
    """

    def __init__(
        self,
        models: Sequence[str],
        adapter_dist: AdapterDist,
        prompt_len: LengthDist,
        output_len: LengthDist,
        seed: int | None,
        zipf_alpha: float = 1.0,
    ) -> None:
        rng = random.Random(seed)
        self._rng = random.Random(rng.getrandbits(64))
        chooser_rng = random.Random(rng.getrandbits(64))
        self.chooser = AdapterChooser(models, adapter_dist, chooser_rng, zipf_alpha)
        self.arrival_rng = random.Random(
            rng.getrandbits(64)
        )  # own stream: rate changes nothing else
        self.prompt_len = prompt_len
        self.output_len = output_len
        self._count = 0

    def next_spec(self) -> RequestSpec:
        adapter = self.chooser.choose()
        words = self.prompt_len.sample(self._rng)
        max_tokens = self.output_len.sample(self._rng)
        spec = RequestSpec(self._count, adapter, synth_prompt(words, self._rng), words, max_tokens)
        self._count += 1
        return spec
