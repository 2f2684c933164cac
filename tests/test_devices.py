"""The device list and the comparator of greedy outputs (tests/devices.py)."""

import os

import pytest
import torch

from tests.devices import (
    DEVICES,
    TRITON_DEVICE,
    check_logprobs_close,
    first_near_tie,
    use_triton_interpreter,
)


def test_devices_follow_torch():
    assert DEVICES[0] == "cpu"
    assert ("cuda" in DEVICES) == torch.cuda.is_available()
    # The interpreter is on exactly where Triton has no GPU (or was asked for by hand).
    assert use_triton_interpreter() == (os.environ["TRITON_INTERPRET"] == "1")
    expected = "cpu" if use_triton_interpreter() else "cuda"
    assert expected == TRITON_DEVICE
    if not torch.cuda.is_available():
        assert TRITON_DEVICE == "cpu"


def top(*pairs: tuple[int, float]) -> dict[int, float]:
    return dict(pairs)


CLEAR = top((1, -0.1), (2, -3.0), (3, -4.0), (4, -5.0), (5, -6.0), (6, -7.0))
TIE = top((7, -0.70), (8, -0.72), (1, -4.0), (2, -5.0), (3, -6.0), (4, -7.0))
TIE_FLIPPED = top((8, -0.69), (7, -0.71), (1, -4.0), (2, -5.0), (3, -6.0), (4, -7.0))


def test_first_near_tie():
    assert first_near_tie([CLEAR, CLEAR]) == 2
    assert first_near_tie([CLEAR, TIE, CLEAR]) == 1
    assert first_near_tie([CLEAR, TIE], margin=0.01) == 2


def test_identical_outputs_pass():
    seq = ([1, 1, 7], [CLEAR, CLEAR, TIE])
    check_logprobs_close([seq], [seq])


def test_a_different_token_before_any_near_tie_fails():
    reference = ([1, 1], [CLEAR, CLEAR])
    other = ([1, 2], [CLEAR, top((2, -0.1), (1, -3.0))])
    with pytest.raises(AssertionError, match="token 1: 2 instead of 1"):
        check_logprobs_close([reference], [other])


def test_a_flip_at_a_near_tie_passes_and_later_positions_are_not_compared():
    reference = ([1, 7, 1, 1], [CLEAR, TIE, CLEAR, CLEAR])
    # Diverged at the tie; afterwards anything (even a token outside every top 5) is allowed.
    other = ([1, 8, 99, 98], [CLEAR, TIE_FLIPPED, top((99, -0.1)), top((98, -0.1))])
    check_logprobs_close([reference], [other])


def test_after_a_near_tie_each_token_must_be_in_the_others_top_k():
    reference = ([1, 7, 1], [CLEAR, TIE, CLEAR])
    far = top((9, -0.1), (2, -3.0), (3, -4.0), (4, -5.0), (5, -6.0), (6, -7.0))
    other = ([1, 7, 9], [CLEAR, TIE, far])  # same tokens up to the tie, then 9: not in top 5
    with pytest.raises(AssertionError, match="token 2: 9 is not in the reference's top 5"):
        check_logprobs_close([reference], [other])
    with pytest.raises(AssertionError, match="token 2: 1 is not in the other's top 5"):
        check_logprobs_close([reference], [([1, 7, 1], [CLEAR, TIE, far])])


def test_lengths_and_counts_are_checked():
    seq = ([1, 1], [CLEAR, CLEAR])
    with pytest.raises(AssertionError, match="1 tokens, the reference has 2"):
        check_logprobs_close([seq], [([1], [CLEAR])])
    with pytest.raises(AssertionError, match="2 reference sequences"):
        check_logprobs_close([seq, seq], [seq])
    with pytest.raises(AssertionError, match="one logprobs dict per token"):
        check_logprobs_close([seq], [([1, 1], [CLEAR])])
