"""The incremental detokenizer: streamed text adds up to a full decode, never shows a broken
UTF-8 character, cuts stop strings (also across tokens) and flushes held-back text."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from goat_runtime.engine.detokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    window_decoder,
)

FIXTURE_TOKENIZER = Path(__file__).parents[1] / "fixtures" / "goat-peft-tiny" / "base"
EOS = "<|endoftext|>"
TEXT = "hello world, 世界 says 🎉🦙 héllo wörld and the lazy dog; stop here. 日本語 ok"


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained in memory on ASCII text only, so that non-ASCII
    characters stay split into their UTF-8 bytes across several tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there",
              "stop here and stop there, says the dog"] * 10
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)


@pytest.fixture(scope="module")
def word_level():
    return AutoTokenizer.from_pretrained(str(FIXTURE_TOKENIZER))


def stream(detokenizer: IncrementalDetokenizer, ids: list[int], step: int = 1) -> list[str]:
    chunks = [detokenizer.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    return [*chunks, detokenizer.finish()]


def test_the_byte_level_fixture_splits_characters_across_tokens(byte_bpe):
    ids = byte_bpe.encode(TEXT)
    assert byte_bpe.decode(ids) == TEXT
    assert sum(byte_bpe.decode([i]) == REPLACEMENT_CHAR for i in ids) >= 10


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_streamed_text_equals_the_full_decode(byte_bpe, step):
    prompt = byte_bpe.encode("prompt: 世")
    ids = byte_bpe.encode(TEXT)
    detokenizer = IncrementalDetokenizer(byte_bpe, prompt)
    chunks = stream(detokenizer, ids, step)
    assert "".join(chunks) == byte_bpe.decode(ids) == detokenizer.text
    assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks)
    assert detokenizer.stop_reason is None
    assert chunks[-1] == ""  # nothing held back at the end of a well-formed text


def test_text_is_emitted_as_soon_as_characters_complete(byte_bpe):
    ids = byte_bpe.encode("a🎉b")
    assert len(ids) >= 5  # "a", four bytes of the emoji (some may merge), "b"
    detokenizer = IncrementalDetokenizer(byte_bpe, [])
    chunks = [detokenizer.add([i]) for i in ids]
    assert chunks[0] == "a"
    assert chunks[-2] == "🎉" and all(chunk == "" for chunk in chunks[1:-2])
    assert chunks[-1] == "b"


def test_word_level_fixture_tokenizer(word_level):
    ids = [7, 8, 9, 10, 11]
    alone = stream(IncrementalDetokenizer(word_level, []), ids)
    assert alone == ["w7", " w8", " w9", " w10", " w11", ""]
    assert "".join(alone) == word_level.decode(ids, skip_special_tokens=True)
    # After a prompt the output decodes in its context: it continues the prompt's text.
    prompt = word_level.encode("w3 w4 w5")
    after_prompt = stream(IncrementalDetokenizer(word_level, prompt), ids)
    assert after_prompt[0] == " w7"
    full, prompt_text = word_level.decode(prompt + ids), word_level.decode(prompt)
    assert "".join(after_prompt) == full[len(prompt_text):]


def test_special_tokens_skipped_or_kept(byte_bpe, word_level):
    eos = byte_bpe.convert_tokens_to_ids(EOS)
    ids = [*byte_bpe.encode("hi there"), eos]
    assert "".join(stream(IncrementalDetokenizer(byte_bpe, [eos]), ids)) == "hi there"
    kept = IncrementalDetokenizer(byte_bpe, [eos], skip_special_tokens=False)
    assert "".join(stream(kept, ids)) == "hi there" + EOS
    ids = [3, 2, 4]  # "</s>" in the middle
    assert "".join(stream(IncrementalDetokenizer(word_level, [1]), ids)) == "w3 w4"


def test_stop_string_across_token_boundaries(byte_bpe):
    ids = byte_bpe.encode(TEXT)
    stop = "lo wö"  # spans "hé|llo", " ", "w", the two bytes of "ö"
    detokenizer = IncrementalDetokenizer(byte_bpe, [], stop=[stop])
    chunks = []
    for i in range(len(ids)):
        chunks.append(detokenizer.add([ids[i]]))
        if detokenizer.stop_reason is not None:
            break
    assert detokenizer.stop_reason == stop
    assert i < len(ids) - 1  # stopped early
    expected = TEXT[:TEXT.index(stop)]
    assert "".join(chunks) == expected == detokenizer.text
    assert not any(stop in chunk or REPLACEMENT_CHAR in chunk for chunk in chunks)
    assert detokenizer.add(ids[i + 1:]) == ""  # nothing after a stop
    assert detokenizer.finish() == ""
    assert detokenizer.text == expected


def test_stop_string_with_multibyte_characters(byte_bpe):
    ids = byte_bpe.encode(TEXT)
    detokenizer = IncrementalDetokenizer(byte_bpe, [], stop=["界 s"])
    chunks = stream(detokenizer, ids)
    assert "".join(chunks) == "hello world, 世"
    assert detokenizer.stop_reason == "界 s"


def test_the_earliest_stop_string_wins(byte_bpe):
    ids = byte_bpe.encode(TEXT)
    detokenizer = IncrementalDetokenizer(byte_bpe, [], stop=["lazy", "says", "world"])
    chunks = stream(detokenizer, ids, step=len(ids))  # all at once: several matches
    assert chunks == ["hello ", ""]
    assert detokenizer.stop_reason == "world"


def test_possible_stop_prefix_is_held_back_then_flushed(byte_bpe):
    ids = byte_bpe.encode("say stop her")
    detokenizer = IncrementalDetokenizer(byte_bpe, [], stop=["stop here"])
    chunks = [detokenizer.add([i]) for i in ids]
    assert "".join(chunks) == "say "  # "stop her" may still become "stop here"
    assert detokenizer.text == "say "
    assert detokenizer.finish() == "stop her"
    assert detokenizer.text == "say stop her"
    assert detokenizer.stop_reason is None


def test_held_back_text_is_released_when_the_stop_string_cannot_follow(byte_bpe):
    detokenizer = IncrementalDetokenizer(byte_bpe, [], stop=["stop here"])
    emitted = "".join(detokenizer.add([i]) for i in byte_bpe.encode("stop there"))
    assert emitted + detokenizer.finish() == "stop there"
    assert emitted.startswith("stop ")


def test_finish_flushes_an_incomplete_character(byte_bpe):
    ids = byte_bpe.encode("ok 🎉")[:-1]  # cut inside the emoji's bytes
    detokenizer = IncrementalDetokenizer(byte_bpe, [])
    chunks = [detokenizer.add([i]) for i in ids]
    assert "".join(chunks) == "ok "
    flushed = detokenizer.finish()
    assert REPLACEMENT_CHAR in flushed
    assert "".join(chunks) + flushed == byte_bpe.decode(ids)


def test_decodes_only_a_short_window_per_token(byte_bpe):
    """Per-token cost does not grow with the output: every decode call gets a few tokens."""
    calls: list[int] = []

    class Counting:
        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return byte_bpe.decode(ids, **kwargs)

    ids = byte_bpe.encode(TEXT * 20)
    detokenizer = IncrementalDetokenizer(Counting(), byte_bpe.encode("a long prompt " * 50))
    assert "".join(stream(detokenizer, ids)) == byte_bpe.decode(ids)
    assert max(calls) <= 12
    assert len(calls) <= 2 * len(ids) + 2


def test_add_after_finish_and_bad_stop_raise(byte_bpe):
    detokenizer = IncrementalDetokenizer(byte_bpe, [])
    detokenizer.finish()
    with pytest.raises(RuntimeError):
        detokenizer.add([1])
    with pytest.raises(TypeError):
        IncrementalDetokenizer(byte_bpe, [], stop="stop")
    with pytest.raises(ValueError):
        IncrementalDetokenizer(byte_bpe, [], stop=[""])


class Wrapped:
    """A tokenizer seen only through its `decode`: the generic path."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


@pytest.mark.parametrize("skip", [True, False])
def test_the_rust_decode_shortcut_streams_what_the_tokenizer_decodes(byte_bpe, word_level, skip):
    """A fast tokenizer is decoded by its Rust tokenizer directly; the text, special tokens
    included or skipped, is the generic path's, token by token."""
    for tokenizer in (byte_bpe, word_level):
        assert window_decoder(tokenizer, skip).func == tokenizer.backend_tokenizer.decode
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        ids = tokenizer.encode(TEXT + " the end")
        ids = [*ids[:5], eos, *ids[5:], eos]
        for prompt in ([], ids[:3]):
            fast = stream(IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip),
                          ids)
            generic = stream(IncrementalDetokenizer(Wrapped(tokenizer), prompt,
                                                    skip_special_tokens=skip), ids)
            assert fast == generic
        whole = tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert "".join(stream(IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip),
                              ids)) == whole


def test_a_tokenizer_class_that_decodes_its_own_way_keeps_it(byte_bpe):
    class Shouting(type(byte_bpe)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    shouting = Shouting(tokenizer_object=byte_bpe.backend_tokenizer, eos_token=EOS)
    ids = byte_bpe.encode("hello world")
    assert "".join(stream(IncrementalDetokenizer(shouting, []), ids)) == "HELLO WORLD"
