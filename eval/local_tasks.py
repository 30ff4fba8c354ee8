"""The offline tasks shipped with dsv3: their YAML lives in `tasks/` (package data), their data is built here.

- `dsv3_pydoc_ppl`   perplexity of the held-out part of CPython's pydoc text (dsv3.corpus.pydoc_split), in
                     chunks of whole paragraphs; word/byte/token perplexity and bits per byte.
- `dsv3_pydoc_order` 4-way multiple choice on the held-out paragraphs: the first words of a paragraph, then
                     its next words in their real order or in one of three shuffled orders. Every choice holds
                     the same words, so only a model that learned word order beats chance (25%); a random
                     model does not.
- `dsv3_gsm8k`       lm-eval's gsm8k over a local copy of the GSM8K test set (`../shared/data/tasks` beside a
                     source checkout, or $DSV3_GSM8K), few-shot examples drawn from the other test problems.

The held-out text depends on the Python version, so the data is built when lm-eval loads the task (the YAML
names these functions as `custom_dataset`); nothing derived from it is shipped. lm-eval passes the task
metadata, which includes the model arguments, to these functions: the perplexity task reads the tokenizer from
them to count tokens.
"""

import json
import os
import random
import re
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ("dsv3_pydoc_ppl", "dsv3_pydoc_order", "dsv3_gsm8k")

PPL_CHUNK_CHARS = (
    2000  # a perplexity document: consecutive held-out paragraphs up to about this many characters
)
ORDER_CHOICES = 4
ORDER_MIN_WORDS = 9  # paragraphs shorter than this make no item (3 context words + at least 6 to shuffle)
ORDER_MAX_WORDS = 24  # longer paragraphs are cut: the item is about local word order, not the whole paragraph
ORDER_SEED = 1234
GSM8K_ENV = "DSV3_GSM8K"


def _heldout_paragraphs() -> list[str]:
    from dsv3.corpus import pydoc_split

    return [p for p in pydoc_split()[1].split("\n\n") if p.strip()]


def perplexity_chunks(paragraphs: list[str] | None = None, chunk_chars: int = PPL_CHUNK_CHARS) -> list[str]:
    """Consecutive paragraphs joined by blank lines, each chunk closed once it reaches `chunk_chars`."""
    chunks: list[str] = []
    current: list[str] = []
    size = -2  # the joined length: paragraphs plus a blank line between each two
    for paragraph in _heldout_paragraphs() if paragraphs is None else paragraphs:
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= chunk_chars:
            chunks.append("\n\n".join(current))
            current, size = [], -2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def word_order_items(paragraphs: list[str] | None = None, seed: int = ORDER_SEED) -> list[dict]:
    """One item per usable paragraph: {"context", "choices", "gold"}; the true continuation sits at a seeded
    random position, so a model that always picks the first (or any fixed) choice scores chance."""
    items = []
    for index, paragraph in enumerate(_heldout_paragraphs() if paragraphs is None else paragraphs):
        words = paragraph.split()[:ORDER_MAX_WORDS]
        if len(words) < ORDER_MIN_WORDS:
            continue
        n_context = max(3, len(words) // 3)
        context, rest = words[:n_context], words[n_context:]
        rng = random.Random(f"{seed}-{index}")
        true = " ".join(rest)
        shuffled: list[str] = []
        for _ in range(100):  # a few repeated words make some permutations equal; 100 tries is plenty
            candidate = rest[:]
            rng.shuffle(candidate)
            text = " ".join(candidate)
            if text != true and text not in shuffled:
                shuffled.append(text)
            if len(shuffled) == ORDER_CHOICES - 1:
                break
        else:
            continue  # too few distinct orders (e.g. a row of identical tokens): no fair item
        gold = rng.randrange(ORDER_CHOICES)
        items.append(
            {
                "context": " ".join(context),
                "choices": [*shuffled[:gold], true, *shuffled[gold:]],
                "gold": gold,
            }
        )
    return items


def _token_counter(metadata: dict):
    """How many tokens lm-eval's HF/vLLM models score for a document: the tokenizer named by the model
    arguments (`tokenizer`, else `pretrained`), encoding like HFLM.tok_encode (special tokens unless
    add_bos_token says)."""
    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(name, str | os.PathLike):
        raise ValueError(
            "dsv3_pydoc_ppl counts tokens with the model's tokenizer: pass pretrained=PATH or tokenizer=PATH "
            "in the model arguments (or --metadata)"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(name), trust_remote_code=bool(metadata.get("trust_remote_code"))
    )
    add_bos = metadata.get("add_bos_token")
    kwargs = {} if add_bos is None else {"add_special_tokens": str(add_bos).lower() == "true"}
    # verbose=False: a document longer than the model's context is fine here (lm-eval scores it in windows).
    return lambda text: len(tokenizer.encode(text, verbose=False, **kwargs))


def _dataset_dict(rows: list[dict]):
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(rows)})


def pydoc_perplexity_dataset(**metadata):
    count = _token_counter(metadata)
    return _dataset_dict([{"text": text, "n_tokens": count(text)} for text in perplexity_chunks()])


def pydoc_order_dataset(**metadata):
    return _dataset_dict(word_order_items())


def process_perplexity(doc: dict, results: list[float]) -> dict:
    # Word and byte counts as lm-eval's wikitext / pile tasks; tokens as counted by the model's tokenizer.
    (loglikelihood,) = results
    text = doc["text"]
    n_words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, n_words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
        "token_perplexity": (loglikelihood, doc["n_tokens"]),
    }


def shared_data_dir() -> Path:
    # A source checkout sits beside ../shared; an installed package has no such folder (use $DSV3_GSM8K then).
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def gsm8k_path() -> Path:
    path = Path(os.environ.get(GSM8K_ENV) or shared_data_dir() / "tasks" / "gsm8k_test.jsonl")
    if not path.is_file():
        raise FileNotFoundError(
            f"GSM8K test set not found at {path} (set {GSM8K_ENV}=/path/to/gsm8k_test.jsonl, with fields "
            "question and answer)"
        )
    return path


def gsm8k_dataset(**metadata):
    path = gsm8k_path()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bad = next((i for i, r in enumerate(rows) if not {"question", "answer"} <= set(r)), None)
    if bad is not None:
        raise ValueError(f"{path}: line {bad + 1} lacks 'question' or 'answer'")
    return _dataset_dict([{"question": r["question"], "answer": r["answer"]} for r in rows])
