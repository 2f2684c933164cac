"""Train a GOAT adapter on a synthetic task and save it for serving: the training loop (AdamW,
warmup then cosine decay, gradient clipping, the load-balancing loss) and its command line.
The model being trained is `trainer.GoatTrainer`; the tasks are `tasks.py`'s.

    goat-serve adapters train --task uppercase --out adapters/uppercase --steps 30
    python -m goat_runtime.training.train --task uppercase --out adapters/uppercase --steps 30
"""

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from goat_runtime.adapters.format import GOAT_INIT_TYPES
from goat_runtime.training.tasks import (
    TASKS,
    Example,
    Task,
    answer_ids,
    eval_examples,
    get_task,
    prompt_ids,
)
from goat_runtime.training.trainer import AdapterSpec, GoatTrainer, PackedBatch, pack


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults: what the demo adapters use."""

    task: str
    out: Path
    model_dir: Path | None = None  # None: the embedded SmolLM2-135M-Instruct
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    steps: int = 30
    batch_size: int = 8
    lr: float = 5e-3
    warmup_steps: int = 5  # linear warmup, then cosine decay to lr / 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    aux_loss_coeff: float = 1e-3
    seed: int = 0
    threads: int = 1
    eval_prompts: int = 0  # > 0: measure accuracy with the engine after training
    static_cache_dir: Path | None = None  # None: the server's default cache



@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float  # the training loop
    setup_seconds: float  # loading the base, SVD init, the initial and base losses
    losses: list[float]  # per step: the language-model loss
    aux_losses: list[float]
    initial_loss: float  # on the first batch, before any update
    base_loss: float  # the base model (no adapter) on the first batch
    num_parameters: int
    size_bytes: int
    eval: dict[str, object] | None = None  # accuracies and a few samples, with --eval


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(task: Task, tokenizer: PreTrainedTokenizerBase, batch_size: int, seed: int,
            held_out: Sequence[Example]) -> Callable[[], tuple[PackedBatch, list[Example]]]:
    """Fresh training batches from `seed`, never a held-out prompt."""
    rng, skip = random.Random(seed), {e.prompt for e in held_out}

    def next_batch() -> tuple[PackedBatch, list[Example]]:
        examples: list[Example] = []
        while len(examples) < batch_size:
            example = task.sample(rng)
            if example.prompt not in skip:
                examples.append(example)
        prompts = [prompt_ids(tokenizer, e.prompt) for e in examples]
        seqs = [p + answer_ids(tokenizer, e.answer) for p, e in zip(prompts, examples,
                                                                     strict=True)]
        return pack(seqs, [len(p) for p in prompts]), examples

    return next_batch


class _Progress(Protocol):
    """What the loop uses of a tqdm bar."""

    def set_postfix(self, **values: str) -> None: ...
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int) -> _Progress | None:
    try:
        from tqdm import tqdm
    except ImportError:  # plain lines on stderr
        return None
    bar: _Progress = tqdm(total=total, file=sys.stderr, desc="training", unit="step",
                          dynamic_ncols=True)
    return bar


def train(config: TrainConfig, task: Task | None = None, *, progress: bool = True) -> TrainResult:
    """Train a GOAT adapter on `task` (default: config.task) and save it to config.out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, task, progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, task: Task | None, progress: bool) -> TrainResult:
    from transformers import AutoTokenizer

    setup_started = time.monotonic()
    torch.manual_seed(config.seed)
    model_dir = config.model_dir
    if model_dir is None:
        from goat_runtime.default_model import default_model_dir

        model_dir = default_model_dir()
    task = task or get_task(config.task)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trainer = GoatTrainer(model_dir, config.adapter, seed=config.seed,
                          static_cache_dir=config.static_cache_dir)
    held_out = eval_examples(task, max(config.eval_prompts, 50))
    next_batch = batches(task, tokenizer, config.batch_size, config.seed, held_out)
    optimizer = torch.optim.AdamW(trainer.trainable_parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    losses, aux_losses = [], []
    first_batch, _ = next_batch()
    with torch.no_grad():
        initial_loss = trainer.losses(first_batch)[0].item()
        base_loss = base_model_loss(trainer, first_batch)
    setup_seconds = time.monotonic() - setup_started
    started = time.monotonic()
    bar = _progress(config.steps) if progress else None
    trainer.train()
    for step in range(config.steps):
        batch = first_batch if step == 0 else next_batch()[0]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        lm_loss, aux = trainer.losses(batch)
        loss = lm_loss + config.aux_loss_coeff * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        torch.nn.utils.clip_grad_norm_(trainer.trainable_parameters(), config.max_grad_norm)
        optimizer.step()
        losses.append(lm_loss.item())
        aux_losses.append(aux.item())
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", aux=f"{aux_losses[-1]:.3f}")
            bar.update(1)
        elif progress:
            print(f"step {step + 1}/{config.steps} loss {losses[-1]:.4f} aux "
                  f"{aux_losses[-1]:.4f} ({time.monotonic() - started:.0f}s)", file=sys.stderr,
                  flush=True)
    if bar is not None:
        bar.close()
    seconds = time.monotonic() - started
    trainer.eval()
    out = trainer.save(config.out, base_name(Path(model_dir)))
    result = TrainResult(
        out=out, steps=config.steps, seconds=seconds, setup_seconds=setup_seconds,
        losses=losses, aux_losses=aux_losses,
        initial_loss=initial_loss, base_loss=base_loss,
        num_parameters=sum(p.numel() for p in trainer.trainable_parameters()),
        size_bytes=(out / "adapter_model.safetensors").stat().st_size)
    if config.eval_prompts > 0:
        from goat_runtime.training.tasks import evaluate

        ev = evaluate(model_dir, out, task, config.eval_prompts,
                      static_cache_dir=config.static_cache_dir)
        result.eval = {"n": ev.n, "adapter_accuracy": ev.adapter_accuracy,
                       "base_accuracy": ev.base_accuracy, "samples": ev.samples[:5]}
    return result


@torch.no_grad()
def base_model_loss(trainer: GoatTrainer, batch: PackedBatch) -> float:
    """The loss of the base model itself (no adapter, no residual) on `batch`."""
    with trainer.adapter_disabled():
        return trainer.losses(batch)[0].item()


def base_name(model_dir: Path) -> str:
    from goat_runtime.default_model import HF_REPO_ID, MODEL_NAME

    return HF_REPO_ID if model_dir.name == MODEL_NAME else str(model_dir)


# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="goat-serve adapters train",
        description="Train a GOAT adapter on a synthetic task (fp32, CPU) and save it as a "
                    "GOAT-PEFT folder the server loads.")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    p.add_argument("--model", type=Path, default=None,
                   help="base model directory (default: the embedded SmolLM2-135M-Instruct)")
    d = TrainConfig(task="", out=Path())
    a = AdapterSpec()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--rank", type=int, default=a.rank, help="total rank over all experts")
    p.add_argument("--experts", type=int, default=a.num_experts)
    p.add_argument("--top-k", type=int, default=a.top_k)
    p.add_argument("--alpha", type=float, default=a.lora_alpha, help="lora_alpha")
    p.add_argument("--init-type", choices=GOAT_INIT_TYPES, default=a.init_type)
    p.add_argument("--init-cof", type=float, default=None,
                   help="static residual coefficient (default 1/experts, as the reference)")
    p.add_argument("--targets", default=",".join(a.target_modules),
                   help=f"comma-separated projections (default {','.join(a.target_modules)})")
    p.add_argument("--aux-loss-coeff", type=float, default=d.aux_loss_coeff)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default 1)")
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="after training, measure accuracy on N held-out prompts with the engine")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = AdapterSpec(rank=args.rank, num_experts=args.experts, top_k=args.top_k,
                           lora_alpha=args.alpha, init_type=args.init_type,
                           init_cof=args.init_cof,
                           target_modules=tuple(t.strip() for t in args.targets.split(",")
                                                if t.strip()))
        config = TrainConfig(task=args.task, out=args.out, model_dir=args.model, adapter=spec,
                             steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, aux_loss_coeff=args.aux_loss_coeff,
                             threads=args.threads, eval_prompts=args.eval)
        result = train(config, progress=not args.quiet)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in asdict(result).items() if k not in ("losses", "aux_losses")}
    summary.update(out=str(result.out), seconds=round(result.seconds, 1),
                   setup_seconds=round(result.setup_seconds, 1),
                   final_loss=round(sum(result.losses[-5:]) / len(result.losses[-5:]), 4))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
