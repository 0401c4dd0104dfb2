"""Corpus ingestion: documents -> passages with stable ids, plus labelled questions.

Interface:

- ``Passage(id, text, title)`` and ``LabelledQuestion(id, question, passage_id, answers,
  answerable)`` are frozen records; ``Corpus(passages, questions)`` holds both and checks that
  passage ids are unique, texts non-empty and every question points at a known passage.
- ``load_text_files(paths)``: each file is split into passages on blank lines; passage ``i`` of
  ``notes.txt`` is ``notes.txt:i``.
- ``load_jsonl(path)``: one JSON object per line with ``text`` (required), ``id`` and ``title``
  (optional); a missing id becomes ``<file name>:<line number>``.
- ``load_squad(path)``: the SQuAD 1.1/2.0 JSON format. Paragraph ``j`` of article ``t`` is
  passage ``t:j``; every question becomes a ``LabelledQuestion`` naming that passage, with its
  distinct answer texts (none, and ``answerable=False``, for SQuAD 2.0's impossible ones).
- ``load_documents(path)`` picks the loader from the suffix (``.txt``/``.md``, ``.jsonl``,
  ``.json`` = SQuAD) or reads every text file in a directory.
- ``Corpus.save(directory)`` / ``Corpus.load(directory)``: ``passages.jsonl`` and
  ``questions.jsonl``, so an index built from a corpus can be reloaded with the same ids.

Ids are derived from where a passage sits in its source (file name or article title and
position), never from process state, so re-ingesting the same files gives the same ids and
saved retrieval indexes and labelled sets stay valid. Every malformed input raises
``ValueError`` naming the file and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md")
PASSAGES_FILE = "passages.jsonl"
QUESTIONS_FILE = "questions.jsonl"

_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class LabelledQuestion:
    id: str
    question: str
    passage_id: str
    answers: tuple[str, ...]
    answerable: bool


@dataclass(frozen=True)
class Corpus:
    passages: tuple[Passage, ...]
    questions: tuple[LabelledQuestion, ...] = ()

    def __post_init__(self) -> None:
        if not self.passages:
            raise ValueError("passages: the corpus is empty")
        seen: set[str] = set()
        for p in self.passages:
            if not p.id:
                raise ValueError("passages: a passage has an empty id")
            if p.id in seen:
                raise ValueError(f"passages: duplicate passage id {p.id!r}")
            if not p.text.strip():
                raise ValueError(f"passages: passage {p.id!r} has empty text")
            seen.add(p.id)
        for q in self.questions:
            if q.passage_id not in seen:
                raise ValueError(f"questions: {q.id!r} names unknown passage {q.passage_id!r}")

    def texts(self) -> list[str]:
        return [p.text for p in self.passages]

    def ids(self) -> list[str]:
        return [p.id for p in self.passages]

    def answerable(self) -> list[LabelledQuestion]:
        return [q for q in self.questions if q.answerable]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_jsonl(directory / PASSAGES_FILE, (asdict(p) for p in self.passages))
        _write_jsonl(directory / QUESTIONS_FILE, (asdict(q) for q in self.questions))

    @classmethod
    def load(cls, directory: str | Path) -> Corpus:
        directory = Path(directory)
        passages = [Passage(**row) for row in _read_jsonl(directory / PASSAGES_FILE)]
        questions_path = directory / QUESTIONS_FILE
        questions = []
        if questions_path.exists():
            for row in _read_jsonl(questions_path):
                row["answers"] = tuple(row["answers"])
                questions.append(LabelledQuestion(**row))
        return cls(tuple(passages), tuple(questions))


def load_text_files(paths: Iterable[str | Path]) -> Corpus:
    paths = [Path(p) for p in paths]
    passages: list[Passage] = []
    for path in paths:
        text = _read_text(path)
        chunks = [c.strip() for c in _BLANK_LINES.split(text) if c.strip()]
        passages.extend(Passage(f"{path.name}:{i}", c, path.stem) for i, c in enumerate(chunks))
    if not passages:
        raise ValueError(f"passages: no text in {', '.join(map(str, paths))}")
    return Corpus(tuple(passages))


def load_jsonl(path: str | Path) -> Corpus:
    path = Path(path)
    passages: list[Passage] = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        row = _parse_json(line, f"{path}:{n}")
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object")
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{n}: field 'text' must be a non-empty string")
        passages.append(Passage(str(row.get("id", f"{path.name}:{n}")), text.strip(),
                                str(row.get("title", ""))))
    if not passages:
        raise ValueError(f"passages: {path} holds no passages")
    return Corpus(tuple(passages))


def load_squad(path: str | Path) -> Corpus:
    path = Path(path)
    doc = _parse_json(_read_text(path), str(path))
    articles = _field(doc, "data", list, str(path))
    passages: list[Passage] = []
    questions: list[LabelledQuestion] = []
    for a, article in enumerate(articles):
        where = f"{path}: data[{a}]"
        title = _field(article, "title", str, where)
        for j, paragraph in enumerate(_field(article, "paragraphs", list, where)):
            pwhere = f"{where}.paragraphs[{j}]"
            passage = Passage(f"{title}:{j}", _field(paragraph, "context", str, pwhere), title)
            passages.append(passage)
            for k, qa in enumerate(_field(paragraph, "qas", list, pwhere)):
                qwhere = f"{pwhere}.qas[{k}]"
                answers = [_field(ans, "text", str, f"{qwhere}.answers")
                           for ans in _field(qa, "answers", list, qwhere)]
                impossible = qa.get("is_impossible", False)
                questions.append(LabelledQuestion(
                    _field(qa, "id", str, qwhere), _field(qa, "question", str, qwhere),
                    passage.id, tuple(dict.fromkeys(answers)),
                    answerable=bool(answers) and not impossible))
    if not passages:
        raise ValueError(f"passages: {path} holds no paragraphs")
    return Corpus(tuple(passages), tuple(questions))


def load_documents(path: str | Path) -> Corpus:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"passages: no {'/'.join(TEXT_SUFFIXES)} files in {path}")
        return load_text_files(files)
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    if path.suffix == ".json":
        return load_squad(path)
    if path.suffix in TEXT_SUFFIXES:
        return load_text_files([path])
    raise ValueError(f"{path}: unsupported suffix {path.suffix!r} "
                     f"(expected {', '.join(TEXT_SUFFIXES)}, .jsonl or .json)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from e


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from e


def _field(obj: Any, name: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict) or not isinstance(obj.get(name), kind):
        raise ValueError(f"{where}: field {name!r} must be a {kind.__name__}")
    return obj[name]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    return [_parse_json(line, f"{path}:{n}")
            for n, line in enumerate(_read_text(path).splitlines(), start=1) if line.strip()]

