"""IncrementalDetokenizer on trained byte-level BPE and SentencePiece byte-fallback tokenizers."""
from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from engine.tokenizer import SpecialTokens, Tokenizer

_BPE_CORPUS = ["héllo wörld café naïve", "中文 测试 你好 世界", "emoji 😀 🎉 ok",
               "the quick brown fox jumps over the lazy dog"] * 20
_SP_CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world café"] * 20
_SP_MISSING_CHARS = ["中", "文", "€", "😀", "ß"]  # not in the SentencePiece vocab: byte fallback


def _byte_level() -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator(_BPE_CORPUS, trainer)
    return Tokenizer(backend, SpecialTokens(eos_token="<|endoftext|>"))


def _sentencepiece() -> Tokenizer:
    """Llama-style BPE: Metaspace, byte fallback, decoders Replace/ByteFallback/Fuse/Strip."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base = HFTokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = metaspace
    base.train_from_iterator(_SP_CORPUS, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    trained = json.loads(base.to_str())["model"]
    vocab = dict(trained["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                     byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = metaspace
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(backend, SpecialTokens(bos_token="<s>", eos_token="</s>", unk_token="<unk>"))


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return _byte_level()


@pytest.fixture(scope="module")
def sentencepiece() -> Tokenizer:
    return _sentencepiece()


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def any_tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream(tokenizer: Tokenizer, ids: list[int], params: SamplingParams | None = None,
           rng: random.Random | None = None) -> tuple[list[str], IncrementalDetokenizer]:
    """Feeds ids in chunks (1 to 3 ids when rng is given); returns the deltas, flush last."""
    detok = IncrementalDetokenizer(tokenizer, [], params or SamplingParams())
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3) if rng else 1
        deltas.append(detok.add_tokens(ids[i:i + n])[0])
        i += n
    deltas.append(detok.flush())
    return deltas, detok


def char_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Byte-level ids of text encoded one character at a time (stop strings split across ids)."""
    return [i for ch in text for i in tokenizer.encode(ch, add_special_tokens=False)]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_level_deltas_concatenate_to_full_decode_for_random_ids(byte_level,
                                                                     skip_special_tokens):
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for seed in range(200):
        rng = random.Random(seed)
        ids = [rng.randrange(byte_level.vocab_size) for _ in range(rng.randint(1, 40))]
        deltas, detok = stream(byte_level, ids, params, rng)
        expected = byte_level.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected == detok.text, f"seed {seed}"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_sentencepiece_deltas_concatenate_to_full_decode_for_random_pieces(sentencepiece,
                                                                           skip_special_tokens):
    backend = sentencepiece.backend
    pieces = [[i] for i in range(sentencepiece.vocab_size)
              if not backend.id_to_token(i).startswith("<0x")]
    pieces += [[backend.token_to_id(f"<0x{b:02X}>") for b in ch.encode()]
               for ch in _SP_MISSING_CHARS]  # complete byte-fallback characters
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for seed in range(200):
        rng = random.Random(seed)
        ids = [i for _ in range(rng.randint(1, 30)) for i in rng.choice(pieces)]
        deltas, detok = stream(sentencepiece, ids, params, rng)
        expected = sentencepiece.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected == detok.text, f"seed {seed}"


def test_no_replacement_char_in_deltas_for_valid_text(any_tokenizer):
    alphabet = ["a", "b", " ", "é", "中", "文", "😀", "€", "the", " fox", "\n", "ß"]
    for seed in range(100):
        rng = random.Random(seed)
        text = "".join(rng.choice(alphabet) for _ in range(20))
        ids = any_tokenizer.encode(text, add_special_tokens=False)
        deltas, _ = stream(any_tokenizer, ids)
        assert not any("\ufffd" in d for d in deltas), f"seed {seed}"
        assert "".join(deltas) == any_tokenizer.decode(ids)


def test_byte_fallback_char_is_held_until_its_last_byte(sentencepiece):
    ids = [sentencepiece.backend.token_to_id(t) for t in ("▁hello", "<0xE2>", "<0x82>", "<0xAC>")]
    detok = IncrementalDetokenizer(sentencepiece, [], SamplingParams())
    assert [detok.add_tokens([i])[0] for i in ids] == ["hello", "", "", "€"]


def test_byte_level_char_split_across_tokens_is_held_until_complete(byte_level):
    ids = byte_level.encode("ok€", add_special_tokens=False)
    assert len(ids) >= 3  # "€" is three single-byte tokens in this vocab
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams())
    deltas = [detok.add_tokens([i])[0] for i in ids]
    assert "".join(deltas[:-1]) == "ok" and deltas[-1] == "€"


def test_chunk_ending_mid_character_emits_its_complete_prefix(byte_level):
    ids = byte_level.encode("ok€", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams())
    assert detok.add_tokens(ids[:-1]) == ("ok", None)
    assert detok.add_tokens(ids[-1:]) == ("€", None)


def test_flush_decodes_incomplete_bytes_as_replacement_chars(sentencepiece):
    ids = [sentencepiece.backend.token_to_id(t) for t in ("▁hello", "<0xE2>", "<0x82>")]
    detok = IncrementalDetokenizer(sentencepiece, [], SamplingParams())
    assert detok.add_tokens(ids) == ("hello", None)
    tail = detok.flush()
    assert "\ufffd" in tail and "hello" + tail == sentencepiece.decode(ids)


def test_sentencepiece_leading_space_matches_full_decode(sentencepiece):
    ids = sentencepiece.encode("hello world", add_special_tokens=False)
    assert sentencepiece.convert_ids_to_tokens(ids)[0].startswith("▁")
    deltas, _ = stream(sentencepiece, ids)
    assert deltas[0] == "hello"
    assert "".join(deltas) == sentencepiece.decode(ids) == "hello world"


@pytest.mark.parametrize("skip_special_tokens, expected", [(True, "hello world"),
                                                           (False, "hello</s> world")])
def test_special_tokens_follow_skip_special_tokens(sentencepiece, skip_special_tokens, expected):
    hello, world = sentencepiece.encode("hello world", add_special_tokens=False)
    ids = [hello, sentencepiece.eos_token_id, world]
    deltas, _ = stream(sentencepiece, ids, SamplingParams(skip_special_tokens=skip_special_tokens))
    assert "".join(deltas) == expected


def test_stop_string_split_across_tokens_is_not_leaked(byte_level):
    text = "the quick brown fox jumps"
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=("fox j",)))
    emitted, matched = "", None
    for token_id in char_ids(byte_level, text):
        delta, matched = detok.add_tokens([token_id])
        emitted += delta
        assert "the quick brown ".startswith(emitted)
        if matched:
            break
    assert (emitted, matched) == ("the quick brown ", "fox j")


def test_include_stop_str_in_output_keeps_the_stop_string(byte_level):
    params = SamplingParams(stop=("fox",), include_stop_str_in_output=True)
    deltas, detok = stream(byte_level, char_ids(byte_level, "the brown fox jumps"), params)
    assert "".join(deltas) == detok.text == "the brown fox"
    assert detok.matched_stop == "fox"


def test_earliest_stop_string_wins(byte_level):
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=("jumps", "quick", "dog")))
    ids = byte_level.encode("the quick fox jumps over the dog", add_special_tokens=False)
    assert detok.add_tokens(ids) == ("the ", "quick")


def test_nothing_is_emitted_after_a_stop_string(byte_level):
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=("fox",)))
    assert detok.add_tokens(char_ids(byte_level, "a fox b")) == ("a ", "fox")
    assert detok.add_tokens(char_ids(byte_level, " more")) == ("", None)
    assert detok.flush() == ""
    assert detok.text == "a "


def test_text_that_cannot_start_a_stop_string_is_emitted_at_once(byte_level):
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=("\n\n",)))
    assert detok.add_tokens(char_ids(byte_level, "abc")) == ("abc", None)


def test_flush_returns_text_held_for_a_possible_stop_string(byte_level):
    detok = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=("fox jumps",)))
    assert detok.add_tokens(char_ids(byte_level, "the brown fox")) == ("the brown ", None)
    assert detok.flush() == "fox"
    assert detok.text == "the brown fox"


def test_streamed_stop_equals_a_search_of_the_full_text(any_tokenizer):
    alphabet = ["a", "b", " ", "é", "中", "文", "😀", "€", "\n"]
    for seed in range(100):
        rng = random.Random(seed)
        text = "".join(rng.choice(alphabet) for _ in range(30))
        ids = any_tokenizer.encode(text, add_special_tokens=False)
        full = any_tokenizer.decode(ids)
        start = rng.randrange(len(full))
        stop = full[start:start + rng.randint(1, 4)]
        start = full.find(stop)
        include = rng.random() < 0.5
        params = SamplingParams(stop=(stop,), include_stop_str_in_output=include)
        expected = full[:start + len(stop)] if include else full[:start]
        deltas, detok = stream(any_tokenizer, ids, params, rng)
        assert "".join(deltas) == expected and detok.matched_stop == stop, f"seed {seed}"


def test_each_step_decodes_only_a_short_window(sentencepiece, monkeypatch):
    lengths: list[int] = []
    decode = sentencepiece.decode

    def spy(ids, skip_special_tokens=True):
        lengths.append(len(ids))
        return decode(ids, skip_special_tokens)

    ids = sentencepiece.encode("the quick brown fox 中文 € " * 200, add_special_tokens=False)
    monkeypatch.setattr(sentencepiece, "decode", spy)
    detok = IncrementalDetokenizer(sentencepiece, [], SamplingParams(stop=("never",)))
    for token_id in ids:
        detok.add_tokens([token_id])
    monkeypatch.undo()
    assert len(ids) > 1000 and max(lengths) <= 8
    assert detok.text + detok.flush() == sentencepiece.decode(ids)
