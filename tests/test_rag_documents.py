"""Plain documents in: chunking, HTML and PDF extraction, and the bad inputs of issue 23
(empty folder, binary file, document with no text, chunk size 0), each naming the file or
the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.rag.corpus import Chunking, chunk_text, load_documents


def test_chunking_packs_paragraphs_and_overlaps_long_ones() -> None:
    text = "a b c\n\nd e\n\n" + " ".join(f"w{i}" for i in range(10))
    chunks = chunk_text(text, Chunking(words=6, overlap=2))
    assert chunks[0] == "a b c\n\nd e"          # two short paragraphs packed (5 words)
    assert chunks[1:] == ["w0 w1 w2 w3 w4 w5", "w4 w5 w6 w7 w8 w9"]  # windows share 2 words
    assert all(len(c.split()) <= 6 for c in chunks)
    assert chunk_text("x " * 7, Chunking(words=3, overlap=0)) == ["x x x", "x x x", "x"]


@pytest.mark.parametrize("words,overlap,flag", [(0, 0, "--chunk-words"), (-3, 0, "--chunk-words"),
                                                (5, 5, "--chunk-overlap"),
                                                (5, -1, "--chunk-overlap")])
def test_bad_chunk_sizes_name_the_flag(words: int, overlap: int, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        Chunking(words, overlap)


def test_folder_of_mixed_documents(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.md").write_text("# Rivers\n\nThe Loire is the longest river in France.")
    (tmp_path / "sub" / "page.html").write_text(
        "<html><head><title>Seine</title><style>p {color: red}</style>"
        "<script>var x = 1;</script></head><body><p>The Seine flows through "
        "Paris.</p><p>It is 777&nbsp;km long.</p></body></html>")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00")  # not a document type: skipped
    corpus = load_documents(tmp_path, Chunking(words=12, overlap=0))
    texts = dict(zip(corpus.ids(), corpus.texts()))
    assert texts["notes.md:0"] == "# Rivers\n\nThe Loire is the longest river in France."
    html = " ".join(v for k, v in texts.items() if k.startswith("sub/page.html:"))
    assert "Paris." in html and "777 km long." in html
    assert "color" not in html and "var x" not in html


def test_pdf_text(tmp_path: Path) -> None:
    pypdf = pytest.importorskip("pypdf")
    writer = pypdf.PdfWriter()
    writer.add_blank_page(200, 200)
    path = tmp_path / "blank.pdf"
    with path.open("wb") as f:
        writer.write(f)
    with pytest.raises(ValueError, match=f"passages: {path} has no text"):
        load_documents(path)
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"not a pdf at all")
    with pytest.raises(ValueError, match=f"{bad}: cannot read the PDF"):
        load_documents(bad)


def test_bad_documents_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"passages: no .* files in {empty}"):
        load_documents(empty)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("Some text.")
    (docs / "nul.txt").write_bytes(b"text\x00\x01\x02")
    with pytest.raises(ValueError, match=f"{docs / 'nul.txt'}: cannot read .binary"):
        load_documents(docs)
    (docs / "nul.txt").unlink()
    (docs / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=f"{docs / 'latin1.txt'}: cannot read"):
        load_documents(docs)
    (docs / "latin1.txt").unlink()
    (docs / "blank.md").write_text("\n   \n\n")
    with pytest.raises(ValueError, match=f"passages: {docs / 'blank.md'} has no text"):
        load_documents(docs)
