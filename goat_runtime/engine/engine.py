"""The synchronous engine: step() = schedule -> bind adapters -> forward -> sample -> emit.

One base model, many adapters: each step runs every scheduled sequence, whatever its adapter,
in one forward pass; the step context carries each token's adapter slot to the routed op.
Everything here runs on one thread (the async front's engine thread, or a test's).
"""

import functools
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from collections.abc import Sequence as Seq
from typing import Any

import torch
from transformers import AutoTokenizer

from goat_runtime.engine.adapter_manager import AdapterManager
from goat_runtime.engine.block_allocator import BlockAllocator
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.detokenizer import IncrementalDetokenizer
from goat_runtime.engine.faults import (
    EngineDeadError,
    describe,
    probe,
    request_error,
    run_isolated,
)
from goat_runtime.engine.outputs import (
    CompletionDelta,
    EngineError,
    EngineListener,
    RequestOutput,
    TokenLogprobs,
    check_prompt,
)
from goat_runtime.engine.request import Request, Sequence, SequenceStatus
from goat_runtime.engine.sampler import (
    SampledTokens,
    SamplingRow,
    _is_greedy,
    make_generator,
    prompt_logprobs,
    sample,
)
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from goat_runtime.engine.structured import GrammarError, Grammars, token_bitmask
from goat_runtime.model import load_model
from goat_runtime.model.context import build_step_context, step_context
from goat_runtime.model.kv_cache import KVCache, cache_blocks_for_budget

logger = logging.getLogger(__name__)

# How a step's faults are narrowed down: by adapter, then by request (faults.run_isolated).
_SCHEDULED_KEYS: tuple[Callable[[ScheduledSeq], Hashable], ...] = (
    lambda i: i.seq.adapter or "", lambda i: i.seq.request.request_id)
_SEQUENCE_KEYS: tuple[Callable[[Sequence], Hashable], ...] = (
    lambda s: s.adapter or "", lambda s: s.request.request_id)

# Prompt positions whose logits exist at once when prompt logprobs are computed (64 rows of a
# 49k vocabulary: 12.6 MB of float32, and as much again for their log-softmax).
PROMPT_LOGITS_ROWS = 64


# Prompt tokens a step takes while it runs a thread short for adapter loads (_share_cores): a
# full 512-token prefill step then took 1.7-2.0 s on one thread, most of it after the reads had
# ended (churn, 500 adapters: 0.77-0.81x -> 0.87-0.97x of resident; docs/benchmarks.md).
LOADING_PREFILL_TOKENS = 128

# How long a read may wait for the idle cores before a step gives the reader one of its threads
# (_share_cores): an unstarved read takes 60-160 ms under load.
LOAD_PATIENCE_S = 0.25


class LLMEngine:
    def __init__(self, config: EngineConfig, listener: EngineListener | None = None):
        self.config = config
        self.listener = listener
        self.device, dtype = config.torch_device, config.torch_dtype
        self.model = load_model(config.model_dir, dtype, self.device)
        self.tokenizer = load_tokenizer(config)
        model_config = self.model.config
        self.vocab_size = model_config.vocab_size
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        self.block_size = config.block_size
        num_blocks = cache_blocks_for_budget(config.kv_cache_memory, model_config,
                                             config.block_size, dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {config.kv_cache_memory} bytes holds no KV block "
                             f"of {config.block_size} tokens for this model")
        self.num_blocks = num_blocks
        self.model.attach_kv_cache(KVCache(model_config, num_blocks, config.block_size, dtype,
                                           self.device))
        self.allocator = BlockAllocator(num_blocks)
        self.adapters = AdapterManager(
            self.model.fused_linears(), adapter_dir=config.adapter_dir,
            max_loras=config.max_device_slots, max_cpu_adapters=config.max_cpu_adapters,
            max_lora_rank=config.max_lora_rank, static_cache_dir=config.static_cache_dir,
            listener=listener, store_config=config.store_config(),
            max_cpu_memory=config.max_cpu_adapter_memory,
            max_device_memory=config.max_gpu_adapter_memory)
        if config.merge_static:
            self.adapters.merge_static(self.adapters.start_up_adapters(config.adapters))
        if config.pack_weights:  # the base weights are final from here on
            self.model.pack_weights()
        for name, path in config.adapters.items():  # fail at start, not at the first request
            self.adapters.request_load(name, path, pinned=True).result()
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.block_size, config.enable_prefix_caching,
                            policy=config.scheduling_policy),
            self.allocator, self.adapters)
        eos = set(model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids,
                                 config.grammar_compile_timeout)
        self.requests: dict[str, Request] = {}
        # the CPU's intra-op threads (set by the server at start-up), see _share_cores
        self._cpu_threads = torch.get_num_threads() if self.device.type == "cpu" else None

    # ---- requests ---------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: Seq[int], params: SamplingParams,
                      adapter: str | None) -> None:
        """Raise EngineError (400 or 404) for a request the engine cannot serve."""
        check_prompt(prompt_token_ids, params.max_tokens, self.vocab_size, self.max_model_len)
        total = len(prompt_token_ids) + params.max_tokens
        if -(-total // self.block_size) > self.num_blocks:
            raise EngineError(f"The request needs {total} tokens of KV cache; the cache holds "
                              f"{self.num_blocks * self.block_size}.", status=400)
        if adapter is not None and not self.adapters.known(adapter):
            raise EngineError(f"The model `{adapter}` does not exist.", status=404)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: str | None = None, tenant: str = "") -> None:
        if request_id in self.requests:
            raise EngineError(f"Request id {request_id!r} is already running.", status=400)
        self.check_request(prompt_token_ids, params, adapter)
        # cached when the async front compiled it off this thread
        grammar = self.grammars.compile(params.constraint) if params.constraint else None
        if adapter is not None:
            # Held before its load is asked for, so that no trim evicts it in between.
            self.adapters.acquire(adapter)
            try:
                self.adapters.request_load(adapter)
            except Exception:
                self.adapters.release(adapter)
                raise
        request = Request(request_id, list(prompt_token_ids), params, adapter, tenant)
        for i in range(params.n):
            seq = Sequence(request, i, make_generator(params.seed, i, self.device))
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens, stop=params.stop)
            if grammar is not None:
                seq.matcher = self.grammars.matcher(grammar)
            request.sequences.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now, freeing its blocks and adapter reference."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.aborted = True
        deltas = []
        for seq in request.sequences:
            if seq.status is not SequenceStatus.FINISHED:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
                deltas.append(CompletionDelta(seq.index, "", [], None, "abort"))
        return self._finish_request(request, deltas)

    def has_work(self) -> bool:
        return bool(self.requests)

    # ---- one step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        short = self._share_cores()
        outputs = self._fail_unloadable()
        scheduled = self.scheduler.schedule(
            len(self.scheduler.running) + LOADING_PREFILL_TOKENS if short else None)
        failures: dict[str, Exception] = {}  # request id -> the fault charged to it
        for seq, exc in self.scheduler.take_faults():
            failures.setdefault(seq.request.request_id, exc)
        scheduled = [i for i in scheduled if i.seq.request.request_id not in failures]
        now = time.monotonic()
        for item in scheduled:
            if item.seq.request.first_scheduled_time is None:
                item.seq.request.first_scheduled_time = now
        deltas = self._run(scheduled, failures) if scheduled else {}
        for request_id, request_deltas in deltas.items():
            if request_id in failures:
                continue
            request = self.requests[request_id]
            if request.finished:
                outputs.append(self._finish_request(request, request_deltas))
            else:
                outputs.append(self._output(request, request_deltas, finished=False))
        if failures:
            outputs += self._fail_charged(failures, scheduled)
        if self.listener:
            self.listener.on_step(len(scheduled), sum(i.num_new_tokens for i in scheduled),
                                  sorted({i.seq.adapter for i in scheduled if i.seq.adapter}))
            if scheduled:  # an empty step only waits for adapter loads
                self.listener.on_step_time(time.perf_counter() - start)
        return outputs

    def _share_cores(self) -> bool:
        """On the CPU the reader process runs at idle priority, on what the engine leaves idle
        (between ops and steps); but OpenMP's workers spin between ops, so a saturated engine
        leaves it nothing (10 loads never ended beside 8 decoding sequences). Once a read has
        waited LOAD_PATIENCE_S, the step's ops run on one thread fewer until the queued reads
        are done: not a thread each read, switching at every read made steps of 0.5-0.8 s
        (docs/benchmarks.md section 7). Returns whether this step runs a thread short: it then
        takes at most LOADING_PREFILL_TOKENS prompt tokens, so that the engine has its thread
        back soon after the reads end."""
        if self._cpu_threads is None:
            return False
        wanted = self._cpu_threads
        since = self.adapters.reads_waiting_since()
        if since is not None and time.monotonic() - since >= LOAD_PATIENCE_S:
            wanted = max(1, wanted - 1)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        return wanted < self._cpu_threads

    def _run(self, scheduled: list[ScheduledSeq],
             failures: dict[str, Exception]) -> dict[str, list[CompletionDelta]]:
        """Forward, sample and append the step's tokens; a fault is charged to the requests it
        happens for (added to `failures`), and the others go on (faults.py)."""
        deltas: dict[str, list[CompletionDelta]] = {}
        for group, (logits, rows) in run_isolated(
                scheduled, self._forward, _SCHEDULED_KEYS,
                lambda items, exc: _charge(failures, (i.seq.request.request_id for i in items),
                                           exc)):
            sampled = [s for s in self._mark_computed(group, failures)
                       if s.request.request_id not in failures]
            if sampled:
                self._sample_and_append(sampled, logits, rows, failures, deltas)
        return deltas

    def _mark_computed(self, group: list[ScheduledSeq],
                       failures: dict[str, Exception]) -> list[Sequence]:
        """Tell the scheduler the group's tokens are computed; returns the sequences that now
        have all their tokens computed (to be sampled)."""
        complete: list[Sequence] = []
        for item in group:
            try:
                self.scheduler.computed(item)
            except Exception as exc:  # charged to this request
                _charge(failures, [item.seq.request.request_id], exc)
            if item.seq.num_computed_tokens == item.seq.num_tokens:
                complete.append(item.seq)
        return complete

    def _sample_and_append(self, sampled: list[Sequence], logits: torch.Tensor,
                           rows: dict[int, int], failures: dict[str, Exception],
                           deltas: dict[str, list[CompletionDelta]]) -> None:
        """Sample the sequences' next tokens from their logits rows and append them, adding
        each sequence's delta to `deltas`; faults are charged as in _run."""
        for seqs, result in run_isolated(
                sampled, functools.partial(self._sample, logits, rows), _SEQUENCE_KEYS,
                lambda seqs, exc: _charge(failures, (s.request.request_id for s in seqs), exc)):
            for seq, token, lp in zip(seqs, result.token_ids, result.logprobs, strict=True):
                request_id = seq.request.request_id
                if request_id in failures:
                    continue
                try:
                    delta = self._append(seq, token, lp)
                except Exception as exc:  # charged to this request
                    _charge(failures, [request_id], exc)
                    continue
                if delta is not None:
                    deltas.setdefault(request_id, []).append(delta)

    def _sample(self, logits: torch.Tensor, rows: dict[int, int],
                seqs: list[Sequence]) -> SampledTokens:
        """Sample `seqs`' next tokens; if that raises, their generators are as they were (so
        that a rerun draws the same)."""
        states = [(s.generator, s.generator.get_state()) for s in seqs
                  if not _is_greedy(s.request.params)]
        try:
            return sample(logits[[rows[id(s)] for s in seqs]], [
                SamplingRow(s.request.params, s.request.prompt_token_ids, s.output_token_ids,
                            s.generator, self.eos_token_ids) for s in seqs],
                token_bitmask([s.matcher for s in seqs], logits.shape[1]))
        except Exception:
            for generator, state in states:
                generator.set_state(state)
            raise

    def _fail_charged(self, failures: dict[str, Exception],
                      scheduled: list[ScheduledSeq]) -> list[RequestOutput]:
        """Fail the requests charged with faults, freeing their blocks, adapter references and
        queue places. If no request of the step went on, a probe tells a fault of the engine
        from one of these requests: when it fails too, the engine is dead."""
        outputs = []
        for request_id, exc in failures.items():
            request = self.requests.get(request_id)
            if request is None:
                continue
            logger.error("request %s failed in the engine (the others go on)", request_id,
                         exc_info=exc)
            for seq in request.sequences:
                if seq.status is not SequenceStatus.FINISHED:
                    self.scheduler.finish(seq)
            out = self._finish_request(request, [])
            out.error = exc if isinstance(exc, GrammarError) else request_error(exc)
            outputs.append(out)
        if all(i.seq.request.request_id in failures for i in scheduled):
            try:
                probe(self)
            except Exception as exc:
                first = describe(next(iter(failures.values())))
                raise EngineDeadError(f"{first}; a base-model probe then failed too: "
                                      f"{describe(exc)}") from exc
        return outputs

    @torch.inference_mode()
    def _forward(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, dict[int, int]]:
        """Run the step; returns the logits rows and, per sampled sequence, its row."""
        slots = self.adapters.bind({i.seq.adapter for i in scheduled if i.seq.adapter})
        input_ids: list[int] = []
        num_logits: list[int] = []
        rows: dict[int, int] = {}
        prompt_chunks: list[tuple[Request, int, int, int]] = []  # request, token, position, count
        for item in scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            if self._wants_prompt_logprobs(seq):
                prompt_chunks.append((seq.request, len(input_ids), start, n))
            input_ids += seq.token_ids[start : start + n]
            completes = start + n == seq.num_tokens
            if completes:
                rows[id(seq)] = len(rows)
            num_logits.append(1 if completes else 0)
        positions, ctx = build_step_context(
            [i.num_new_tokens for i in scheduled],
            [i.seq.num_computed_tokens + i.num_new_tokens for i in scheduled],
            [i.seq.blocks for i in scheduled], [slots[i.seq.adapter] for i in scheduled],
            self.block_size, self.device, num_logits=num_logits)
        if self.listener is not None and len(slots) > 1:
            ctx.expert_counts = self.adapters.expert_counts_buffer()
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        with step_context(ctx):
            hidden = self.model(ids, positions)
            logits = self.model.compute_logits(hidden)
        if ctx.expert_counts is not None and self.listener is not None:
            _report_expert_counts(self.listener, ctx.expert_counts.cpu(), slots)
        for request, first, start, count in prompt_chunks:
            self._add_prompt_logprobs(request, hidden[first : first + count], start)
        return logits, rows

    def _add_prompt_logprobs(self, request: Request, hidden: torch.Tensor, start: int) -> None:
        """The prompt logprobs of one prefill chunk (prompt positions start.. with these hidden
        states), PROMPT_LOGITS_ROWS rows of logits at a time: a [len(prompt), vocab] tensor
        would be 400 MB for 2,000 tokens of a 49k vocabulary."""
        entries, ranks = request.prompt_entries, request.prompt_ranks
        prompt = request.prompt_token_ids
        if len(entries) < start + 1:
            raise RuntimeError(f"prompt logprobs of request {request.request_id} reach token "
                               f"{len(entries)}; the chunk starts at {start}")
        del entries[start + 1 :]  # a recompute after preemption replaces what it computed
        del ranks[start + 1 :]
        targets = prompt[start + 1 : start + 1 + hidden.shape[0]]  # the last predicts no prompt
        num = request.params.prompt_logprobs or 0
        for a in range(0, len(targets), PROMPT_LOGITS_ROWS):
            b = min(a + PROMPT_LOGITS_ROWS, len(targets))
            chunk, chunk_ranks = prompt_logprobs(self.model.logits(hidden[a:b]), targets[a:b],
                                                 num)
            entries += chunk
            ranks += chunk_ranks
        if len(entries) == len(prompt):
            request.prompt_logprobs = entries

    @staticmethod
    def _wants_prompt_logprobs(seq: Sequence) -> bool:
        request = seq.request
        return (request.params.prompt_logprobs is not None and seq.index == 0
                and request.prompt_logprobs is None
                and seq.num_computed_tokens < len(request.prompt_token_ids))

    def _append(self, seq: Sequence, token: int,
                logprobs: TokenLogprobs | None) -> CompletionDelta | None:
        """Add a sampled token; returns the sequence's delta (None while its text is held)."""
        request, params, detokenizer = seq.request, seq.request.params, seq.detokenizer
        if detokenizer is None:
            raise RuntimeError(f"sequence {seq.index} of request {request.request_id} has no "
                               f"detokenizer (add_request attaches one)")
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        seq.output_token_ids.append(token)
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise GrammarError("No token of the model's vocabulary continues the output within "
                               "its structured-output grammar")
        finish: str | None = None
        stop_reason: str | int | None = None
        if token in params.stop_token_ids:
            finish, stop_reason = "stop", token
        elif (token in self.eos_token_ids and not params.ignore_eos) or (
                seq.matcher is not None and seq.matcher.is_terminated()):
            finish = "stop"
        if finish is None:
            text = detokenizer.add([token])
            if detokenizer.stop_reason is not None:  # the stop string is not emitted
                finish, stop_reason = "stop", detokenizer.stop_reason
            elif (len(seq.output_token_ids) >= params.max_tokens
                  or seq.num_tokens >= self.max_model_len):
                finish = "length"
                text += detokenizer.finish()
        else:  # a stop token or EOS: in token_ids, not in the text
            text = detokenizer.finish()
        if finish is not None:
            seq.finish_reason, seq.stop_reason = finish, stop_reason
            self.scheduler.finish(seq)
        return CompletionDelta(seq.index, text, [token],
                               [logprobs] if logprobs is not None else None,
                               finish, stop_reason)

    def _output(self, request: Request, deltas: list[CompletionDelta],
                finished: bool) -> RequestOutput:
        first = request.prompt_logprobs is not None and not request.prompt_logprobs_sent
        if first:
            request.prompt_logprobs_sent = True
        return RequestOutput(request.request_id, deltas, finished,
                             len(request.prompt_token_ids),
                             prompt_logprobs=request.prompt_logprobs if first else None,
                             prompt_logprob_ranks=request.prompt_ranks if first else None)

    def _finish_request(self, request: Request, deltas: list[CompletionDelta]) -> RequestOutput:
        out = self._output(request, deltas, finished=True)
        now = time.monotonic()
        out.metrics = {
            "arrival_time": request.arrival_time,
            "first_scheduled_time": request.first_scheduled_time or now,
            "first_token_time": request.first_token_time or now,
            "finished_time": now,
        }
        del self.requests[request.request_id]
        if request.adapter is not None:
            self.adapters.release(request.adapter)
        return out

    def _fail_unloadable(self) -> list[RequestOutput]:
        """End the requests whose adapter failed to load, with the loader's error, and those
        whose adapter is gone from the host while they wait (never, with their reference held:
        but a waiting request must not wait forever)."""
        outputs = []
        for request in list(self.requests.values()):
            name = request.adapter
            if name is None:  # the base model is always there
                continue
            status = self.adapters.status(name)
            if status not in ("failed", "unknown"):
                continue
            if any(s.status is SequenceStatus.RUNNING for s in request.sequences):
                continue
            for seq in request.sequences:
                self.scheduler.finish(seq)
            out = self._finish_request(request, [])
            if status == "failed":
                out.error = EngineError(f"Adapter `{name}` could not be loaded: "
                                        f"{self.adapters.take_failure(name)}", status=400)
            else:
                out.error = request_error(RuntimeError(f"adapter {name} is not loaded"))
            outputs.append(out)
        return outputs

    def stats(self) -> tuple[int, int, float]:
        """(running sequences, waiting sequences, KV cache usage)."""
        used = 1.0 - self.allocator.num_free / self.num_blocks
        return len(self.scheduler.running), len(self.scheduler.waiting), used


def _charge(failures: dict[str, Exception], request_ids: Iterable[str], exc: Exception) -> None:
    """Charge a fault to these requests (a request keeps the first fault charged to it)."""
    for request_id in request_ids:
        failures.setdefault(request_id, exc)


def load_tokenizer(config: EngineConfig) -> Any:
    """The model's Hugging Face tokenizer (untyped upstream)."""
    return AutoTokenizer.from_pretrained(str(config.model_dir))


def _report_expert_counts(listener: EngineListener, counts: torch.Tensor,
                          slots: dict[str | None, int]) -> None:
    for name, slot in slots.items():
        if name is not None and counts[slot].any():
            listener.on_expert_selections(name, counts[slot].tolist())
