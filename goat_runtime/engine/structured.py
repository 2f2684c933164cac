"""Structured outputs with xgrammar: grammars compiled once per constraint (this engine has one
tokenizer, so the cache is per (tokenizer, constraint)) within a time limit, a matcher per
constrained sequence, and the step's token bitmask, applied to all rows in one operation.

Compiling runs on worker threads: a request waits at most `timeout` seconds for its grammar and
is refused (400) past it, so a pathological schema never stalls the engine thread. A compile
that overruns keeps its worker until it ends (xgrammar cannot be interrupted) and its result is
cached for the next request that asks for it.
"""

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
import xgrammar as xgr

from goat_runtime.engine.outputs import EngineError
from goat_runtime.engine.sampling import Constraint, SamplingParamsError

# What each kind is called in errors.
_WHAT = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex",
         "choice": "choice", "grammar": "grammar (EBNF)", "structural_tag": "structural tag"}


class GrammarError(EngineError):
    """A constrained output that no token of the vocabulary can continue (a grammar this
    tokenizer cannot write): the request's fault, so a 400, not an engine fault."""

    def __init__(self, message: str):
        super().__init__(message, status=400)


class Grammars:
    """Compiled grammars of one tokenizer, cached (LRU) per constraint."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int],
                 timeout: float = 10.0, cache_size: int = 256, workers: int = 2):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self.timeout = timeout
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, bool], Future[xgr.CompiledGrammar]] = (
            OrderedDict())
        self._lock = threading.Lock()
        self._compiler_lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None  # built on first use (~1 s)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="goat-grammar")

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """The constraint's compiled grammar. Raises SamplingParamsError (naming the
        constraint's API field) when it is invalid or does not compile within the time limit."""
        key = (constraint.kind, constraint.spec, constraint.any_whitespace)
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._cache[key] = self._executor.submit(self._compile, constraint)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        what = _WHAT[constraint.kind]
        try:
            return future.result(self.timeout)
        except FutureTimeout:
            raise SamplingParamsError(
                constraint.param, f"The {what} took longer than {self.timeout:g} s to compile "
                "into a grammar; simplify it") from None
        except SamplingParamsError:
            raise
        except Exception as exc:  # xgrammar's verdict on the schema, regex or grammar
            raise SamplingParamsError(constraint.param,
                                      f"Invalid {what}: {exc}".strip()) from exc

    def _compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        with self._compiler_lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size,
                    stop_token_ids=self._stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info)
            compiler = self._compiler
        kind, spec = constraint.kind, constraint.spec
        if kind == "json":
            return compiler.compile_json_schema(spec, any_whitespace=constraint.any_whitespace)
        if kind == "json_object":
            if constraint.any_whitespace:
                return compiler.compile_builtin_json_grammar()
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "choice":
            choices = json.loads(spec)
            if (not isinstance(choices, list) or not choices
                    or not all(isinstance(c, str) for c in choices)):
                raise SamplingParamsError(constraint.param,
                                          "choice must be a non-empty list of strings")
            return compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(c) for c in choices))
        if kind == "grammar":
            return compiler.compile_grammar(spec)
        return compiler.compile_structural_tag(spec)

    def matcher(self, grammar: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        """A fresh matcher: one per constrained sequence, advanced by each token it samples."""
        return xgr.GrammarMatcher(grammar)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_BATCH = xgr.BatchGrammarMatcher()  # fills the rows of a batch on xgrammar's threads


def token_bitmask(matchers: Sequence[xgr.GrammarMatcher | None], vocab_size: int
                  ) -> torch.Tensor | None:
    """The next-token bitmask of a batch: [len(matchers), ceil(vocab_size / 32)] int32 on the
    CPU, bit t of row i set when token t may follow; rows without a matcher allow every token.
    None when no row is constrained."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)  # all ones
    constrained = [m for m in matchers if m is not None]
    _BATCH.batch_fill_next_token_bitmask(constrained, bitmask, rows)
    return bitmask


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Semantics: logits[i, t] = -inf wherever bit t of bitmask[i] is clear, in place, for the
    whole batch in one kernel (xgrammar's; CPU or CUDA), which skips the all-ones rows.

    logits: [N, V] float32, modified in place. bitmask: [N, ceil(V / 32)] int32 (any device)."""
    rows = (bitmask != -1).any(dim=1).nonzero().squeeze(1).tolist()
    if rows:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device),
                                        vocab_size=logits.shape[1], indices=rows)
