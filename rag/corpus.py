"""Corpus ingestion: documents -> passages with stable ids, plus labelled questions.

Interface:

- ``Passage(id, text, title)`` and ``LabelledQuestion(id, question, passage_id, answers,
  answerable)`` are frozen records; ``Corpus(passages, questions)`` holds both and checks that
  passage ids are unique, texts non-empty and every question points at a known passage.
- ``Chunking(words=180, overlap=30)`` (``--chunk-words`` / ``--chunk-overlap``) and
  ``chunk_text(text, chunking)``: paragraphs (split on blank lines) are packed into one
  passage while it stays within ``words`` words; a paragraph longer than that is cut into
  windows of ``words`` words overlapping by ``overlap``. 180 words is about 235 MiniLM tokens,
  within the embedder's 256-token window, so a passage's embedding sees all of it; the
  overlap keeps a sentence cut by a window boundary whole in one of the two windows.
- ``load_text_files(paths, chunking)``: text and Markdown as they are, HTML through the
  standard library's ``html.parser`` (scripts and styles dropped), PDF through ``pypdf``;
  passage ``i`` of ``notes.txt`` is ``notes.txt:i`` (in a folder: the path relative to it).
- ``load_jsonl(path, chunking)``: one JSON object per line with ``text`` (required), ``id`` and
  ``title`` (optional); a missing id becomes ``<file name>:<line number>``; a text longer
  than one chunk becomes ``<id>#0``, ``<id>#1``, ...
- ``load_squad(path)``: the SQuAD 1.1/2.0 JSON format. Paragraph ``j`` of article ``t`` is
  passage ``t:j``; every question becomes a ``LabelledQuestion`` naming that passage, with its
  distinct answer texts (none, and ``answerable=False``, for SQuAD 2.0's impossible ones).
  SQuAD paragraphs are not re-chunked, so the labels keep pointing at whole passages.
- ``load_documents(path, chunking)`` picks the loader from the suffix (``DOCUMENT_SUFFIXES``)
  or reads every such file under a folder (recursively; other files are skipped).
- ``Corpus.save(directory)`` / ``Corpus.load(directory)``: ``passages.jsonl`` and
  ``questions.jsonl``, so an index built from a corpus can be reloaded with the same ids.

Ids are derived from where a passage sits in its source (file name or article title and
position), never from process state, so re-ingesting the same files gives the same ids and
saved retrieval indexes and labelled sets stay valid. Every malformed input raises
``ValueError`` naming the file and the field: an empty folder, an unreadable or binary file
(not UTF-8, or NUL bytes), a document with no text, a bad chunk size names its flag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md")
HTML_SUFFIXES = (".html", ".htm")
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + (".pdf", ".jsonl", ".json")
DEFAULT_CHUNK_WORDS = 180
DEFAULT_CHUNK_OVERLAP = 30
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


@dataclass(frozen=True)
class Chunking:
    """How documents are cut into passages: ``words`` per passage at most, consecutive
    windows of a long paragraph sharing ``overlap`` words."""

    words: int = DEFAULT_CHUNK_WORDS
    overlap: int = DEFAULT_CHUNK_OVERLAP

    def __post_init__(self) -> None:
        if isinstance(self.words, bool) or not isinstance(self.words, int) or self.words < 1:
            raise ValueError(f"--chunk-words: must be a positive integer, got {self.words!r}")
        if (isinstance(self.overlap, bool) or not isinstance(self.overlap, int)
                or not 0 <= self.overlap < self.words):
            raise ValueError(f"--chunk-overlap: must be an integer in [0, --chunk-words="
                             f"{self.words}), got {self.overlap!r}")


def chunk_text(text: str, chunking: Chunking = Chunking()) -> list[str]:
    """Passages of ``text``: paragraphs (split on blank lines) packed together while the
    passage stays within ``chunking.words`` words; a longer paragraph is cut into windows of
    ``words`` words, each starting ``words - overlap`` words after the previous one."""
    out: list[str] = []
    packed: list[str] = []
    size = 0
    for paragraph in (c.strip() for c in _BLANK_LINES.split(text)):
        n = len(paragraph.split())
        if not n:
            continue
        if size and size + n > chunking.words:
            out.append("\n\n".join(packed))
            packed, size = [], 0
        if n <= chunking.words:
            packed.append(paragraph)
            size += n
            continue
        words = paragraph.split()
        step = chunking.words - chunking.overlap
        for start in range(0, n, step):
            out.append(" ".join(words[start:start + chunking.words]))
            if start + chunking.words >= n:
                break
    if packed:
        out.append("\n\n".join(packed))
    return out


def load_text_files(paths: Iterable[str | Path], chunking: Chunking = Chunking(),
                    root: Path | None = None) -> Corpus:
    """Passages of text, Markdown, HTML and PDF files (``extract_text``), chunked; passage
    ``i`` of ``notes.txt`` is ``notes.txt:i`` (the path relative to ``root`` when given)."""
    passages: list[Passage] = []
    for path in map(Path, paths):
        chunks = chunk_text(extract_text(path), chunking)
        if not chunks:
            raise ValueError(f"passages: {path} has no text")
        name = path.relative_to(root).as_posix() if root else path.name
        passages.extend(Passage(f"{name}:{i}", c, path.stem) for i, c in enumerate(chunks))
    if not passages:
        raise ValueError("passages: no documents given")
    return Corpus(tuple(passages))


def extract_text(path: Path) -> str:
    """The plain text of one document: UTF-8 text and Markdown as they are, HTML through the
    standard library's parser (scripts and styles dropped, block elements end paragraphs),
    PDF page by page through ``pypdf``. ``ValueError`` naming the file when it cannot be
    read, is binary, or is not the format its suffix says."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _pdf_text(path)
    text = _read_text(path)
    if "\x00" in text:
        raise ValueError(f"{path}: cannot read (binary data: NUL bytes in a text file)")
    return _html_text(text) if suffix in HTML_SUFFIXES else text


class _HTMLText(HTMLParser):
    BLOCKS = frozenset("p div br li ul ol h1 h2 h3 h4 h5 h6 tr table section article "
                       "header footer blockquote pre title".split())
    SKIP = frozenset(("script", "style", "noscript", "template"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    paragraphs = (" ".join(p.split()) for p in _BLANK_LINES.split("".join(parser.parts)))
    return "\n\n".join(p for p in paragraphs if p)


def _pdf_text(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError as e:  # pragma: no cover - pypdf is a dependency
        raise ValueError(f"{path}: PDF needs pypdf (pip install pypdf)") from e
    try:
        reader = PdfReader(str(path))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (OSError, PyPdfError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the PDF ({e})") from e


def load_jsonl(path: str | Path, chunking: Chunking = Chunking()) -> Corpus:
    """One passage per JSON line (``text``, optional ``id`` and ``title``); a text longer
    than ``chunking.words`` is chunked into ``<id>#<i>`` passages."""
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
        pid, title = str(row.get("id", f"{path.name}:{n}")), str(row.get("title", ""))
        chunks = chunk_text(text, chunking)
        if len(chunks) == 1:
            passages.append(Passage(pid, chunks[0], title))
        else:
            passages.extend(Passage(f"{pid}#{i}", c, title) for i, c in enumerate(chunks))
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


def load_documents(path: str | Path, chunking: Chunking = Chunking()) -> Corpus:
    """A corpus from a file or a folder (searched recursively for ``DOCUMENT_SUFFIXES``;
    other files are skipped): ``.jsonl`` rows, SQuAD ``.json`` (its paragraphs are the
    passages, not re-chunked, so its labels stay valid), text/Markdown/HTML/PDF chunked."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)
        if not files:
            raise ValueError(f"passages: no {'/'.join(DOCUMENT_SUFFIXES)} files in {path}")
        parts = [_load_file(f, chunking, path) for f in files]
        return Corpus(tuple(p for c in parts for p in c.passages),
                      tuple(q for c in parts for q in c.questions))
    return _load_file(path, chunking, None)


def _load_file(path: Path, chunking: Chunking, root: Path | None) -> Corpus:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(path, chunking)
    if suffix == ".json":
        return load_squad(path)
    if suffix in TEXT_SUFFIXES + HTML_SUFFIXES + (".pdf",):
        return load_text_files([path], chunking, root)
    raise ValueError(f"{path}: unsupported suffix {path.suffix!r} "
                     f"(expected one of {', '.join(DOCUMENT_SUFFIXES)})")


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

