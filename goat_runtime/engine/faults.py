"""Fault isolation for one engine step: an exception is charged to the requests it happens for.

Work done for a group of sequences at once (the forward pass, sampling) that raises is run
again in smaller groups, one per adapter and then one per request, until the requests it fails
for are found; only those fail, with a 500 naming the cause (the engine frees their blocks and
adapter references), and the others go on. Rerunning is exact: a sequence's progress and its
cached blocks advance only after its group's forward succeeded (a failed forward wrote K/V only
at its own sequences' uncomputed positions, in blocks no other sequence shares, and the rerun
writes the same values there), sampling puts back every generator it advanced, and the forward
and the sampler are batch invariant, so every other request gets exactly the tokens it would
have had without the fault.

A fault no request explains kills the engine: when every request of a step failed, a probe (one
base-model token through the forward and the sampler) decides whether the engine itself still
works; if the probe fails too, `EngineDeadError` ends the engine loop.
"""

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from goat_runtime.engine.outputs import EngineError
from goat_runtime.engine.sampler import SamplingRow, make_generator, sample
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.model.context import build_step_context, step_context

if TYPE_CHECKING:
    from goat_runtime.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class EngineDeadError(RuntimeError):
    """A fault that no request explains: the engine cannot go on."""


def describe(exc: BaseException) -> str:
    """`Type: message`, how a fault is named to clients, /health and the log."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def dead_engine_error(failure: str | None, status: int = 500) -> EngineError:
    """What a request gets from an engine that has died of `failure` (describe's form): 500
    for one it was serving, 503 for one that arrives after."""
    return EngineError(f"The engine failed: {failure}", status=status)


def request_error(exc: Exception) -> EngineError:
    """The error a request charged with a fault fails with (HTTP 500, naming the cause)."""
    return EngineError(f"The engine failed on this request ({describe(exc)}); other requests "
                       "were not affected.", status=500)


def run_isolated(items: list[T], run: Callable[[list[T]], R],
                 keys: Sequence[Callable[[T], Hashable]],
                 charge: Callable[[list[T], Exception], None]) -> list[tuple[list[T], R]]:
    """`run(items)`; if it raises, `run` of each group of items sharing `keys[0]`, recursively
    (a group with one value of a key is split by the next key). A group that still raises when
    no key splits it is charged with its exception. Returns the groups that ran, in order, with
    their results. `run` must leave no trace when it raises (it is run again)."""
    try:
        return [(items, run(items))]
    except Exception as exc:  # any fault is charged or isolated, never lost
        error = exc
    for depth, key in enumerate(keys):
        groups: dict[Hashable, list[T]] = {}
        for item in items:
            groups.setdefault(key(item), []).append(item)
        if len(groups) > 1:
            return [done for group in groups.values()
                    for done in run_isolated(group, run, keys[depth:], charge)]
    charge(items, error)
    return []


@torch.inference_mode()
def probe(engine: "LLMEngine") -> None:
    """One base-model token at position 0 through the forward and a greedy draw; raises what
    they raise. Runs between steps, in one free KV block (skipped when none is free: the
    sequences holding the cache then show soon enough whether the engine works)."""
    if engine.allocator.num_free == 0:
        return
    blocks = engine.allocator.allocate(1)
    try:
        slot = engine.adapters.bind(())[None]
        positions, ctx = build_step_context([1], [1], [blocks], [slot], engine.block_size,
                                            engine.device, num_logits=[1])
        ids = torch.zeros(1, dtype=torch.int64, device=engine.device)
        with step_context(ctx):
            logits = engine.model.compute_logits(engine.model(ids, positions))
        sample(logits, [SamplingRow(SamplingParams(temperature=0.0), [0], [],
                                    make_generator(0, 0, engine.device))])
    finally:
        engine.allocator.free(blocks)
