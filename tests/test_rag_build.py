"""From a folder of plain .txt files to a served answer (issue 23): ``build-index`` writes
everything ``serve --rag-index`` needs (profiles measured on questions generated from the
passages, classes derived from them), an interrupted build resumes where it stopped, an SLO
no configuration meets is served best-effort and reported, and bad input is a clear error.
Real MiniLM embedder, ``tiny`` generator."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import sluice.rag.profiling as profiling
from sluice.rag import cli as rag_cli
from sluice.rag.build import build_index
from sluice.rag.config import PipelineConfig
from sluice.rag.embedder import Embedder
from sluice.rag.http import rag_part
from sluice.rag.corpus import load_documents
from sluice.rag.service import CLASSES_FILE, PROFILES_FILE, RagService, load_classes
from sluice.rag.synthetic import CONTEXT_WORDS, KEEP_CONTENT, generate_questions, question_from
from sluice.rag.text import STOP_WORDS, content_terms
from sluice.runtime import AsyncEngine, load_model
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.server import OpenAIServer, ServerConfig

DOCS = {
    "normans.txt": "The Normans were the people who in the 10th and 11th centuries gave their "
                   "name to Normandy, a region in France. They were descended from Norse "
                   "raiders and pirates from Denmark, Iceland and Norway.\n\nRollo, their "
                   "leader, agreed to swear fealty to King Charles III of West Francia in 911.",
    "rivers.txt": "The Loire is the longest river in France, at 1,006 kilometres. It rises in "
                  "the Massif Central and flows into the Atlantic Ocean at Saint-Nazaire.",
    "physics.txt": "Isaac Newton published the Principia in 1687. In it he stated the three "
                   "laws of motion and the law of universal gravitation.",
    "computing.txt": "Alan Turing described the Turing machine in 1936. The machine reads "
                     "and writes symbols on an infinite tape under a table of rules.",
    "cities.txt": "Paris has been the capital of France since 987, when Hugh Capet made it "
                  "his seat. About 2,100,000 people live in the city proper.",
    "music.txt": "Ludwig van Beethoven wrote nine symphonies. The Ninth Symphony was first "
                 "performed in Vienna in 1824 and ends with a choral setting of Schiller.",
}
CONFIGS = [PipelineConfig("bm25", 1), PipelineConfig("dense", 3),
           PipelineConfig("hybrid", 3, True)]
QUESTIONS = 6


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def _build(docs: Path, out: Path, embedder: Embedder, **kw):
    return build_index(docs, out, profile_questions=QUESTIONS, configs=CONFIGS,
                       embedder=embedder, progress=False, log=lambda _: None, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, docs: Path, embedder: Embedder) -> Path:
    out = tmp_path_factory.mktemp("index")
    report = _build(docs, out, embedder)
    assert report.quality_method == "generated" and report.profiles_measured == len(CONFIGS)
    return out


def test_generated_questions_label_their_passage_and_span(docs: Path) -> None:
    corpus = load_documents(docs)
    questions = generate_questions(corpus, QUESTIONS)
    assert len(questions) == QUESTIONS
    texts = {p.id: p.text for p in corpus.passages}
    for q in questions:
        assert q.question.endswith("?") and q.answers[0] in texts[q.passage_id]
        assert q.answers[0] not in q.question  # the span was replaced by a wh-phrase
    assert generate_questions(corpus, QUESTIONS) == questions  # deterministic
    # more than one per passage when asked: each passage's next sentence with a span
    more = generate_questions(corpus, 2 * len(DOCS))
    assert len(more) > len(DOCS) and len({q.id for q in more}) == len(more)
    assert more[:len(DOCS)] == generate_questions(corpus, len(DOCS))


def test_generated_questions_reword_as_people_do() -> None:
    """A question keeps every stop word of its clause but only about ``KEEP_CONTENT``
    of its content words, which ones fixed by the sentence's place (a SQuAD question
    carries about half of its sentence's content words); ``keep=1`` keeps the clause
    whole, the echo question."""
    sentence = ("The committee of the Royal Geographical Society awarded its golden medal "
                "to Henry Morton Stanley in 1873 for his expedition across central Africa.")
    words = sentence.split()
    at = words.index("1873")
    clause = " ".join(words[at - CONTEXT_WORDS:at] + words[at + 1:at + 1 + CONTEXT_WORDS])
    stop = {w for w in clause.lower().split() if w in STOP_WORDS}
    kept = []
    for where in range(300):
        question, answer = question_from(sentence, f"p{where}|0")
        assert answer == "1873" and question == question_from(sentence, f"p{where}|0")[0]
        assert stop <= {w.strip(".,?").lower() for w in question.split()}
        kept.append(len(content_terms(question) - content_terms("what year")))
    share = sum(kept) / (len(kept) * len(content_terms(clause)))
    assert abs(share - KEEP_CONTENT) < 0.08, share
    assert len(set(kept)) > 1  # which words stay differs from sentence to sentence
    echo, _ = question_from(sentence, "p0|0", keep=1.0)
    assert echo == ("Its golden medal to Henry Morton Stanley in what year for his "
                    "expedition across central Africa?")


def _server(index_dir: Path) -> OpenAIServer:
    engine = AsyncEngine(LLMEngine(load_model("tiny", dtype="float32"),
                                   EngineConfig(warmup=False, max_model_len=512)))
    return OpenAIServer(engine, ServerConfig("tiny"), [rag_part(index_dir)])


@pytest.mark.slow
def test_folder_of_txt_files_to_a_served_answer(built: Path) -> None:
    profiles = json.loads((built / PROFILES_FILE).read_text())
    assert [p["name"] for p in profiles] == [c.name for c in CONFIGS]
    assert all(p["quality_method"] == "generated" and p["exact_match"] is not None
               for p in profiles)
    classes = load_classes(built / CLASSES_FILE)
    fastest = min(p["latency_p95_s"] for p in profiles)
    assert classes["lookup"].slo.latency_p95_s >= fastest  # derived from what was measured
    with TestClient(_server(built).app) as client:
        r = client.post("/v1/rag/query", json={"question": "In what year did Newton publish "
                                                           "the Principia?"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["answer"] and body["passage_ids"][0] == "physics.txt:0"
        assert body["citations"][0]["passage_id"] == body["passage_ids"][0]
        assert body["best_effort"] is False and body["warnings"] == []
        # Longer than the embedder's 256 tokens: cut, with a warning, never a 500.
        r = client.post("/v1/rag/query", json={"question": "Who wrote nine symphonies? "
                                                           + "music " * 400})
        assert r.status_code == 200, r.text
        assert "longer than the embedder's limit of 256" in r.json()["warnings"][0]
        status = client.get("/v1/rag/status").json()["classes"]
        assert all(c["slo_feasible"] for c in status.values())


def _copy(built: Path, target: Path, profiles: bool) -> None:
    """A copy of a built index (with or without its profiles and classes), so a test starts
    from it without embedding the passages again."""
    for f in built.rglob("*"):
        if f.is_file() and (profiles or f.parent != built or f.name == "manifest.json"):
            dst = target / f.relative_to(built)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())


@pytest.mark.slow
def test_interrupted_build_resumes(tmp_path: Path, built: Path, docs: Path,
                                   embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    _copy(built, tmp_path, profiles=False)
    assert not (tmp_path / PROFILES_FILE).exists()
    measured: list[str] = []
    real = profiling.measure

    def interrupt_second(pipeline, config, *args, **kw):
        if len(measured) == 1:
            raise KeyboardInterrupt
        measured.append(config.name)
        return real(pipeline, config, *args, **kw)

    monkeypatch.setattr(profiling, "measure", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        _build(docs, tmp_path, embedder)
    kept = json.loads((tmp_path / PROFILES_FILE).read_text())
    assert [p["name"] for p in kept] == [CONFIGS[0].name]  # written as soon as measured
    assert not (tmp_path / CLASSES_FILE).exists()
    measured.clear()
    monkeypatch.setattr(profiling, "measure", lambda *a, **kw: (measured.append(a[1].name),
                                                               real(*a, **kw))[1])
    report = _build(docs, tmp_path, embedder)
    assert measured == [c.name for c in CONFIGS[1:]]  # the finished one is not re-measured
    assert report.index_reused and report.profiles_reused == 1
    assert report.profiles_measured == len(CONFIGS) - 1
    assert [p["name"] for p in json.loads((tmp_path / PROFILES_FILE).read_text())] == [
        c.name for c in CONFIGS]


@pytest.mark.slow  # shares the built index fixture (an embedding pass and 3 profiles)
def test_unreachable_slo_is_served_best_effort_and_reported(
        tmp_path: Path, built: Path, docs: Path, embedder: Embedder) -> None:
    _copy(built, tmp_path, profiles=True)
    classes = json.loads((tmp_path / CLASSES_FILE).read_text())
    classes["lookup"]["slo"]["latency_p95_s"] = 1e-6
    (tmp_path / CLASSES_FILE).write_text(json.dumps(classes))
    report = _build(docs, tmp_path, embedder)
    assert report.profiles_measured == 0 and set(report.unmet) == {"lookup"}
    assert "latency_p95_s" in report.unmet["lookup"]
    service = RagService.load(tmp_path, embedder=embedder)  # starts instead of refusing
    status = service.status()
    assert status["lookup"]["slo_feasible"] is False
    assert "achievable: latency_p95_s >=" in status["lookup"]["slo_unmet"]
    assert status["analytical"]["slo_feasible"] is True
    out = asyncio.run(service.query("Who described the Turing machine?", "lookup")).to_dict()
    assert out["best_effort"] is True and "latency_p95_s" in out["slo_unmet"]
    assert out["answer"]


@pytest.mark.parametrize("row,message", [
    ({"lookup": {"slo": {"latency_p95_s": "fast"}}},
     "class 'lookup': slo.latency_p95_s: must be a number"),
    ({"lookup": {"slo": {"p99": 1}}}, "class 'lookup': slo: unknown fields"),
    ({"lookup": {"slos": {}}}, "class 'lookup': field 'slo'"),
    ({"poetry": {"slo": {}}}, "class 'poetry': field 'seeds'"),
    ({"lookup": {"slo": {}, "seeds": "Who?"}}, "class 'lookup': field 'seeds'"),
])
def test_bad_classes_file_names_class_and_field(tmp_path: Path, row: dict,
                                                message: str) -> None:
    path = tmp_path / CLASSES_FILE
    path.write_text(json.dumps(row))
    with pytest.raises(ValueError, match=message):
        load_classes(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: cannot read"):
        load_classes(path)


def test_cli_flags_are_checked(tmp_path: Path, docs: Path) -> None:
    parser = argparse.ArgumentParser()
    rag_cli.configure(parser)
    for flags, name in ((["--chunk-words", "0"], "--chunk-words"),
                        (["--chunk-overlap", "500"], "--chunk-overlap"),
                        (["--profile-questions", "0"], "--profile-questions")):
        args = parser.parse_args(["build-index", "--documents", str(docs), "--out",
                                  str(tmp_path), *flags])
        with pytest.raises(ValueError, match=name):
            rag_cli.run(args)


class _FakePipeline:
    """Answers every question with ``answer`` after ``latency`` seconds (as reported)."""

    def __init__(self, answer: str, latency: float, cost: float):
        self.answer, self.latency, self.cost = answer, latency, cost
        self.calls = 0

    def run_sync(self, question: str, config: PipelineConfig):
        self.calls += 1
        return type("R", (), {"answer": self.answer, "latency_s": self.latency,
                              "cost_usd": self.cost})()


def test_a_clearly_dominated_configuration_stops_early() -> None:
    from sluice.rag.corpus import LabelledQuestion
    questions = [LabelledQuestion(f"q{i}", f"Question {i}?", "p", ("Paris",), True)
                 for i in range(20)]
    good = profiling.measure(_FakePipeline("Paris", 0.1, 1e-8), CONFIGS[0], questions)
    assert good.profile.questions == 20 and not good.profile.stopped_early
    slow = _FakePipeline("Paris", 0.5, 1e-8)  # same answers, slower: dominated
    m = profiling.measure(slow, CONFIGS[1], questions, [good])
    assert m.profile.stopped_early and slow.calls == profiling.MIN_QUESTIONS
    assert m.profile.quality == good.profile.quality  # the rival's, less the paired gap (0)
    better = _FakePipeline("Paris", 0.5, 1e-8)
    worse_rival = profiling.measure(_FakePipeline("Lyon", 0.1, 1e-8), CONFIGS[0], questions)
    m = profiling.measure(better, CONFIGS[1], questions, [worse_rival])  # slower but better
    assert not m.profile.stopped_early and better.calls == 20

    # a rival right on the first questions only, far ahead of one always wrong there:
    # the paired estimate (0.3 - 1.0) would be below 0, a quality no F1 has
    early = _FakePipeline("Paris", 0.1, 1e-8)
    early.run_sync = lambda q, c: type("R", (), {
        "answer": "Paris" if int(q.split()[1][:-1]) < 6 else "Lyon", "latency_s": 0.1,
        "cost_usd": 1e-8})()
    rival = profiling.measure(early, CONFIGS[0], questions)
    assert rival.profile.quality == pytest.approx(0.3)
    m = profiling.measure(_FakePipeline("Lyon", 0.5, 1e-8), CONFIGS[1], questions, [rival])
    assert m.profile.stopped_early and m.profile.quality == 0.0


def test_generative_citations_are_the_numbered_passages() -> None:
    from sluice.rag.agents import citations, numbered_context
    from sluice.rag.corpus import Passage
    passages = [Passage("a:0", "Alpha."), Passage("b:0", "Beta."), Passage("c:0", "Gamma.")]
    assert numbered_context(passages) == "[1] Alpha.\n[2] Beta.\n[3] Gamma."
    assert citations("Beta [2], then gamma [3] and [2] again", passages) == ("b:0", "c:0")
    assert citations("no citation [9]", passages) == ("a:0", "b:0", "c:0")
