"""Where the tests run, and how results of two devices or dtypes are compared.

`DEVICES` is what device-generic tests parametrize over: the CPU always, CUDA where torch sees a
device. Triton kernels run in one place per process: compiled on CUDA, or (no CUDA device)
under Triton's interpreter on the CPU, which tests/conftest.py switches on before triton is
imported (`TRITON_DEVICE`).

`check_logprobs_close` is the comparison for greedy outputs of two numerics (float32 against
bfloat16, one device against another), after vLLM's check of the same name: exact tokens are
asked for only where the reference had a clear winner.
"""

import os
from collections.abc import Sequence

import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]


def use_triton_interpreter() -> bool:
    """Whether Triton kernels must run under the interpreter: no CUDA device to compile for, or
    the caller asked for it (TRITON_INTERPRET=1 in the environment)."""
    return os.environ.get("TRITON_INTERPRET", "0" if CUDA else "1") == "1"


TRITON_DEVICE = "cpu" if use_triton_interpreter() else "cuda"

# A position is a near-tie when the reference's two best logprobs are closer than this: half a
# percent of probability mass either way. bfloat16 moves the fixture's logits by up to ~0.01.
NEAR_TIE = 0.05
TOP_K = 5


def first_near_tie(top_logprobs: Sequence[dict[int, float]], margin: float = NEAR_TIE) -> int:
    """The first position whose two best logprobs are within `margin` (len if none)."""
    for pos, top in enumerate(top_logprobs):
        best = sorted(top.values(), reverse=True)
        if len(best) > 1 and best[0] - best[1] < margin:
            return pos
    return len(top_logprobs)


def check_logprobs_close(reference: Sequence[tuple[list[int], list[dict[int, float]]]],
                         other: Sequence[tuple[list[int], list[dict[int, float]]]], *,
                         margin: float = NEAR_TIE, top_k: int = TOP_K,
                         names: Sequence[str] | None = None) -> None:
    """Greedy outputs `other` are close to `reference`: per sequence (tokens, one
    {token: logprob} dict per token holding at least its top_k alternatives):

    - up to the reference's first near-tie (two best logprobs within `margin`), the tokens are
      the reference's, exactly;
    - from there on, at each position each side's token is among the other side's top_k, up to
      and including the first position where the tokens differ: past it the two sequences have
      different contexts, so their positions no longer correspond (vLLM stops there too).

    Raises AssertionError naming the sequence and position.
    """
    if len(reference) != len(other):
        raise AssertionError(f"{len(reference)} reference sequences, {len(other)} others")
    for i, ((ref_tokens, ref_top), (tokens, top)) in enumerate(
            zip(reference, other, strict=True)):
        name = names[i] if names else f"sequence {i}"
        if len(ref_tokens) != len(ref_top) or len(tokens) != len(top):
            raise AssertionError(f"{name}: one logprobs dict per token is needed")
        tie = first_near_tie(ref_top, margin)
        for pos, (ref_token, token) in enumerate(zip(ref_tokens, tokens, strict=False)):
            if pos < tie:
                if token != ref_token:
                    raise AssertionError(
                        f"{name}, token {pos}: {token} instead of {ref_token}, where the "
                        f"reference's margin was clear (no near-tie before {tie})")
                continue
            for have, alternatives, side in ((token, ref_top[pos], "reference's"),
                                             (ref_token, top[pos], "other's")):
                ranked = sorted(alternatives, key=alternatives.__getitem__, reverse=True)
                if have not in ranked[:top_k]:
                    raise AssertionError(f"{name}, token {pos}: {have} is not in the {side} "
                                         f"top {top_k} {ranked[:top_k]}")
            if token != ref_token:
                break
        else:
            if len(ref_tokens) != len(tokens):
                raise AssertionError(f"{name}: {len(tokens)} tokens, the reference has "
                                     f"{len(ref_tokens)}")
