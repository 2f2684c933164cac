"""Synthetic tasks for demo adapters: generated training data and checkers, no downloads.

Each task draws a user message and its exact answer from a seeded `random.Random`, and scores a
model's answer to one of its messages by recomputing the expected answer from the message, so a
held-out evaluation needs nothing but the prompts. The tasks are chosen so that a 135M model with
a rank-8 adapter learns them in minutes of CPU training, and so that a base model, which tends to
chat around the answer, rarely passes: the checkers want the answer and nothing else.

`evaluate` measures a task's accuracy with the serving engine, adapter against base, greedy.

    python -m goat_runtime.training.tasks --task reverse --adapter adapters/reverse -n 50
"""

import argparse
import random
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Short, common, lowercase English words: single tokens or nearly so for BPE tokenizers.
WORDS = (
    "apple", "river", "stone", "green", "house", "cloud", "table", "music", "light", "bread",
    "water", "paper", "chair", "horse", "night", "smile", "plant", "train", "dream", "beach",
    "sugar", "glass", "money", "storm", "heart", "tiger", "queen", "ocean", "field", "candy",
    "forest", "garden", "window", "winter", "summer", "silver", "yellow", "purple", "orange",
    "rabbit", "monkey", "pencil", "doctor", "castle", "bridge", "flower", "market", "planet",
    "cat", "dog", "sun", "moon", "tree", "book", "fish", "bird", "star", "road", "door", "lake",
    "rain", "snow", "wind", "fire", "milk", "rice", "king", "ship", "boat", "lamp", "desk",
    "ball", "song", "gold", "blue", "red", "cold", "warm", "fast", "slow", "happy", "quiet",
    "small", "large", "early", "late", "sweet", "brave", "clean", "dark", "soft", "loud",
)

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """0..999 in English words, hyphenated tens ("three hundred forty-two")."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")


def _words(text: str, *, lower: bool) -> list[str]:
    """The words of an answer, ignoring surrounding punctuation and spacing (not case unless
    `lower`): the checkers judge content, not a trailing period."""
    found = re.findall(r"[A-Za-z]+", text)
    return [w.lower() for w in found] if lower else found


@dataclass(frozen=True)
class Example:
    """One user message and the exact assistant answer it calls for."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Task(ABC):
    """A generator of (message, answer) pairs and a checker of answers to its messages."""

    name: str
    description: str
    max_answer_tokens: int = 24  # generation budget when evaluating

    @abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """A random example; the same rng state gives the same example."""

    @abstractmethod
    def expected(self, prompt: str) -> str:
        """The correct answer to `prompt` (one of this task's messages). ValueError otherwise."""

    @abstractmethod
    def score(self, prompt: str, answer: str) -> bool:
        """Whether `answer` is a correct answer to `prompt` (surrounding whitespace and
        punctuation are ignored; extra words are not)."""

    def examples(self, n: int, seed: int, exclude: Sequence[Example] = ()) -> list[Example]:
        """n distinct examples from `seed`, none with a prompt in `exclude` (held-out sets)."""
        rng, seen = random.Random(seed), {e.prompt for e in exclude}
        out: list[Example] = []
        for _ in range(100 * n + 100):
            if len(out) == n:
                return out
            example = self.sample(rng)
            if example.prompt not in seen:
                seen.add(example.prompt)
                out.append(example)
        raise ValueError(f"task {self.name}: could not draw {n} distinct examples")


def _after(prompt: str, lead: str) -> str:
    if not prompt.startswith(lead):
        raise ValueError(f"not a prompt of this task (expected it to start with {lead!r}): "
                         f"{prompt!r}")
    return prompt[len(lead):]


@dataclass(frozen=True)
class WordListTask(Task):
    """A task on a few random words from `words`: the message is `lead` + the words."""

    lead: str = ""
    words: tuple[str, ...] = WORDS
    min_words: int = 3
    max_words: int = 4

    def sample(self, rng: random.Random) -> Example:
        chosen = rng.sample(self.words, rng.randint(self.min_words, self.max_words))
        prompt = self.lead + " ".join(chosen)
        return Example(prompt, self.expected(prompt))

    def given(self, prompt: str) -> list[str]:
        return _after(prompt, self.lead).split()


@dataclass(frozen=True)
class ReverseTask(WordListTask):
    name: str = "reverse"
    description: str = "reverses the order of the given words"
    lead: str = "Reverse the order of these words: "

    def expected(self, prompt: str) -> str:
        return " ".join(reversed(self.given(prompt)))

    def score(self, prompt: str, answer: str) -> bool:
        return _words(answer, lower=True) == [w.lower() for w in reversed(self.given(prompt))]


@dataclass(frozen=True)
class UppercaseTask(WordListTask):
    name: str = "uppercase"
    description: str = "repeats the given words in capital letters"
    lead: str = "Write these words in capital letters: "

    def expected(self, prompt: str) -> str:
        return " ".join(w.upper() for w in self.given(prompt))

    def score(self, prompt: str, answer: str) -> bool:  # case matters here
        return _words(answer, lower=False) == [w.upper() for w in self.given(prompt)]


@dataclass(frozen=True)
class NumbersTask(Task):
    name: str = "numbers"
    description: str = "writes a number (0 to 999) in English words"
    lead: str = "Write this number in words: "
    max_number: int = 999

    def sample(self, rng: random.Random) -> Example:
        prompt = f"{self.lead}{rng.randint(0, self.max_number)}"
        return Example(prompt, self.expected(prompt))

    def expected(self, prompt: str) -> str:
        digits = _after(prompt, self.lead).strip()
        if not digits.isdigit():
            raise ValueError(f"not a prompt of this task (no number after the lead): {prompt!r}")
        return number_words(int(digits))

    def score(self, prompt: str, answer: str) -> bool:
        # "forty-seven" = "forty seven"; a British "and" ("two hundred and six") is fine too.
        got = [w for w in _words(answer, lower=True) if w != "and"]
        return got == _words(self.expected(prompt), lower=True)


TASKS: dict[str, Task] = {t.name: t for t in (UppercaseTask(), ReverseTask(), NumbersTask())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (tasks: {', '.join(TASKS)})") from None


# Chat formatting


def prompt_ids(tokenizer: Any, message: str) -> list[int]:
    """The token ids of a one-turn chat with `message`, ending with the assistant's header:
    what a chat client sends (the template's default system prompt included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; the tasks are chat tasks")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                        add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns an encoding
        ids = ids["input_ids"]
    return list(ids)


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The assistant's tokens for `answer`, closed by the end-of-turn token, as the model
    should generate them after `prompt_ids`."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end the answer with")
    return [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]


# Evaluation with the serving engine


@dataclass
class EvalResult:
    task: str
    n: int
    adapter_correct: int
    base_correct: int
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # prompt, adapter, base

    @property
    def adapter_accuracy(self) -> float:
        return self.adapter_correct / self.n

    @property
    def base_accuracy(self) -> float:
        return self.base_correct / self.n


EVAL_SEED = 1_000_003  # held-out prompts; training draws from its own seed and skips these


def eval_examples(task: Task, n: int) -> list[Example]:
    return task.examples(n, EVAL_SEED)


def evaluate(model_dir: str | Path, adapter_dir: str | Path, task: Task | str, n: int = 50, *,
             static_cache_dir: Path | None = None) -> EvalResult:
    """Greedy accuracy on n held-out prompts of `task`: the engine serving the adapter at
    `adapter_dir` against the same engine serving the base, all requests in one run."""
    import torch

    from goat_runtime.engine.config import EngineConfig
    from goat_runtime.engine.engine import LLMEngine
    from goat_runtime.engine.sampling import SamplingParams

    task = get_task(task) if isinstance(task, str) else task
    examples = eval_examples(task, n)
    engine = LLMEngine(EngineConfig(
        model_dir=Path(model_dir), adapters={"adapter": Path(adapter_dir)}, device="cpu",
        dtype="float32", static_cache_dir=static_cache_dir, max_loras=1, max_cpu_adapters=1,
        max_num_batched_tokens=2048))
    params = SamplingParams(temperature=0.0, max_tokens=task.max_answer_tokens)
    texts: dict[str, str] = {}
    for i, example in enumerate(examples):
        ids = prompt_ids(engine.tokenizer, example.prompt)
        engine.add_request(f"adapter-{i}", ids, params, "adapter")
        engine.add_request(f"base-{i}", ids, params, None)
        texts[f"adapter-{i}"] = texts[f"base-{i}"] = ""
    with torch.inference_mode():
        while engine.has_work():
            for out in engine.step():
                if out.error is not None:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                texts[out.request_id] += "".join(d.text for d in out.outputs)
    result = EvalResult(task.name, n, 0, 0)
    for i, example in enumerate(examples):
        adapter, base = texts[f"adapter-{i}"], texts[f"base-{i}"]
        result.adapter_correct += task.score(example.prompt, adapter)
        result.base_correct += task.score(example.prompt, base)
        result.samples.append((example.prompt, adapter, base))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m goat_runtime.training.tasks",
        description="Accuracy of an adapter on a synthetic task, against its base (greedy, "
                    "held-out prompts, served by the engine).")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--adapter", type=Path, required=True, help="adapter directory")
    parser.add_argument("--model", type=Path, default=None,
                        help="base model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("-n", type=int, default=50, help="held-out prompts (default 50)")
    parser.add_argument("--show", type=int, default=3, help="answers to print (default 3)")
    args = parser.parse_args(argv)
    model_dir = args.model
    if model_dir is None:
        from goat_runtime.default_model import default_model_dir

        model_dir = default_model_dir()
    result = evaluate(model_dir, args.adapter, args.task, args.n)
    for prompt, adapter, base in result.samples[: args.show]:
        print(f"{prompt!r}\n  adapter: {adapter!r}\n  base:    {base!r}")
    print(f"{result.task}: adapter {result.adapter_correct}/{result.n} "
          f"({result.adapter_accuracy:.0%}), base {result.base_correct}/{result.n} "
          f"({result.base_accuracy:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
