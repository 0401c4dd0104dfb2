"""Structured outputs: constraints on what a completion may say (a JSON schema,
any JSON object, a regex, a choice of strings, a context-free grammar),
enforced by masking the sampler's logits to the tokens the constraint allows.

Interface:

- `StructuredOutputs`: the constraint, one of ``json`` (a JSON schema, dict or
  string), ``json_object``, ``regex``, ``choice`` (strings) or ``grammar``
  (Lark, or GBNF as llama.cpp writes it). Checked when made: a ``ValueError``
  names the field (``"structured_outputs.regex: ..."``) for a schema that is not
  JSON or not valid, a schema keyword the engine does not implement, a regex that
  does not compile or a grammar with a syntax error. `SamplingParams` carries it
  as ``structured_outputs``.
- `GrammarState`: one completion's matcher, held by its `Request` (``grammar``).
  Its state is a function of the constraint and the tokens the completion has
  emitted: the matcher consumes the request's output tokens it has not seen yet
  whenever a mask is asked for, so a request recomputed after preemption, swapped,
  migrated to another engine or re-dispatched after an instance died (its output
  tokens replayed) rebuilds the same state; pickling (Ray) drops the native matcher,
  which is rebuilt from the tokens where the request lands.
- `StructuredOutputManager`: one per engine (its tokenizer and vocabulary). It
  tracks the engine's constrained requests (``admit`` when a group enters the
  engine, queued or adopted by migration; dropped once finished or gone), so
  ``token_masks(rows)`` is None, and a step does no per-row grammar work, while
  none is live. ``fill_masks(requests)`` computes the packed allowed-token masks (int32
  ``[ceil(V / 32)]`` rows, token t = bit t % 32 of word t // 32: the sampler's
  layout, `sluice.runtime.sampler`) of the constrained requests among a step's
  rows, in parallel, while the device runs the forward (the model runner's
  ``token_masks`` hook). Compiled grammars are cached by constraint, so a
  request costs a copy of a compiled matcher, not a compilation.
- `compile_constraint(tokenizer, ...)`: the compiled matcher (its first mask, the
  costly part, computed), cached per tokenizer for the whole process. Intake calls
  it (`sluice.runtime.intake`: the caller's thread for `LLMEngine.add_request` and
  `LLM`, a worker thread for the server and `AsyncEngine`), so the engine step that
  first masks the request finds it compiled, and a grammar llguidance cannot build
  is a ``ValueError`` naming the field (a 400 over HTTP) before the request queues.
  Every matcher runs under `PARSER_LIMITS`. llguidance builds its lexer lazily, so
  a grammar over those limits (``"(a{300}){300}"``: millions of regex expressions)
  can pass the build and fail at its first tokens; compiling therefore also walks
  it `PROBE_TOKENS` tokens down (the lowest allowed token each time) and refuses a
  grammar that fails there. A limit first hit deeper than the probe still ends
  that completion ``"error"`` (below) in a bounded, small time, instead of seconds
  of a step that every other request waits for.
- `StructuredOutputs.from_dict`: the one mapping of a dict of constraint fields
  (the Python API's ``structured_outputs={...}`` and vLLM's ``structured_outputs``
  request object) to the constraint; vLLM's backend options are accepted and
  ignored.
- A constraint that reaches a state where no token is allowed (the matcher hit
  an error or a limit): `GrammarState.refusal(token)` says why, and the request
  ends with ``finish_reason`` ``"error"`` and that message as ``stop_reason``
  instead of appending the token; its siblings and the rest of the batch go on.

Why llguidance (measured 2026-12-02 on this machine, SmolLM2-135M's 49,152-token
vocabulary, a nested JSON schema (objects in arrays, a string pattern), 82 tokens
of a canonical document then EOS, 5 runs after a first; 2 shared CPU cores, so
means carry scheduling noise):

=============== ================= =========== ===================== ==========
engine          Python 3.11/3.12  torch       compile (per schema)  mask p50 / mean
=============== ================= =========== ===================== ==========
llguidance 1.9  both, abi3 wheel  not needed  1-9 ms                12-18 us / 28-55 us
outlines-core   both              not needed  340-850 ms            2-9 us / 105-310 us
xgrammar 0.2.9  both              imported at 26-32 ms (+10.7 s     2-4 us / 5-19 us
                                  ``import``  tokenizer set-up)
=============== ================= =========== ===================== ==========

xgrammar is the fastest per mask but cannot be imported without torch (its
``__init__`` imports it, and pip pulls torch and triton), which rules it out.
outlines-core precompiles a whole-vocabulary automaton per regex, so a new
schema costs a third of a second or more before its first token (and grows
with the schema), its masks in open string states are slower on average, and it
has no context-free grammars (no ``json_object`` for arbitrary nesting, no
``grammar``). llguidance needs neither torch nor a precompile, masks a 49k
vocabulary in tens of microseconds (far below a decode step, and hidden behind
it), and covers every constraint kind here.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

if TYPE_CHECKING:
    from sluice.runtime.model_runner import StepRow
    from sluice.runtime.request import Request
    from sluice.runtime.tokenizer import Tokenizer

# JSON as `json.dumps` writes it by default; no free whitespace, so a model cannot
# spend its tokens on blanks and every completion that ends is the compact form.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                                "key_separator": ": "}
GRAMMAR_CACHE_SIZE = 128  # compiled constraints kept per tokenizer
# llguidance's parser limits, for validation and every matcher: a tenth of its default
# lexer fuel (for the first mask; per later mask). A pathological regex
# ("(a{1000}){1000}", "a{99999999}") spent 0.5-1.9 s (tiny vocabulary; seconds more on
# 49k) of lexer building at the defaults before failing anyway; under these it fails
# within 0.1 s, while the nested schemas and regexes of the tests use a fraction.
PARSER_LIMITS = llguidance.LLParserLimits(initial_lexer_fuel=100_000, step_lexer_fuel=100_000)
# Tokens a compile walks a new grammar down (module docstring): enough for a byte-level
# vocabulary to reach the first value of a small JSON object; each step is one mask
# (tens of microseconds on a 49k vocabulary), once per constraint (compiles are cached).
PROBE_TOKENS = 16
KINDS = ("json", "json_object", "regex", "choice", "grammar")
# vLLM's `structured_outputs` options that pick or tune its backends rather than say
# what the output is: accepted and ignored (Sluice has one backend, and its JSON has
# no free whitespace and keeps a schema's own additionalProperties).
VLLM_BACKEND_OPTIONS = ("backend", "disable_fallback", "disable_any_whitespace",
                        "disable_additional_properties", "whitespace_pattern")
GRAMMAR_ERROR = "error"  # the finish reason of a completion its grammar left no token


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """One constraint on a completion's text (exactly one field set); see the
    module docstring. ``json`` may be a dict or its JSON text."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs: exactly one of json, json_object, regex, "
                             f"choice, grammar must be given, got {given or 'none'}")
        kind = given[0]
        if kind == "json_object" and self.json_object is not True:
            raise ValueError(f"structured_outputs.json_object: must be a bool, "
                             f"got {self.json_object!r}")
        if kind == "choice":
            if not isinstance(self.choice, (list, tuple)) or not self.choice \
                    or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice: must be a non-empty list of "
                                 f"strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if kind in ("regex", "grammar") and not isinstance(getattr(self, kind), str):
            raise ValueError(f"structured_outputs.{kind}: must be a string, "
                             f"got {getattr(self, kind)!r}")
        if kind == "json":
            object.__setattr__(self, "json", _schema_text(self.json))
        _check(self.kind, self.spec)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> StructuredOutputs:
        """The constraint a dict of its fields describes; vLLM's backend options
        (`VLLM_BACKEND_OPTIONS`) are ignored, any other unknown field is a
        ``ValueError`` naming it."""
        unknown = [k for k in fields if k not in KINDS and k not in VLLM_BACKEND_OPTIONS]
        if unknown:
            raise ValueError(f"structured_outputs: unknown field {unknown[0]!r} (the "
                             f"constraint is one of {', '.join(KINDS)})")
        return cls(**{k: v for k, v in fields.items() if k in KINDS})

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint's text, canonical enough to key the grammar caches."""
        value = getattr(self, self.kind)
        if self.kind == "choice":
            return json.dumps(list(value))
        return "" if self.kind == "json_object" else value


def _schema_text(schema: object) -> str:
    """A JSON schema (dict or JSON text) as compact JSON text (its keys in order:
    properties are generated in the order the schema lists them)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json: not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError("structured_outputs.json: a JSON schema must be an object, "
                         f"got {type(schema).__name__}")
    return json.dumps(schema, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class _Key:
    kind: str
    spec: str


_grammar_lock = threading.Lock()


def _grammar(kind: str, spec: str) -> str:
    """The llguidance grammar of a constraint (raises ``ValueError`` naming the field)."""
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                 defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            return llguidance.grammar_from("choice", spec)
        return llguidance.grammar_from("grammar", spec)
    except ValueError as e:
        raise ValueError(f"structured_outputs.{kind}: {e}") from None


_checked: collections.OrderedDict[_Key, str] = collections.OrderedDict()


def _check(kind: str, spec: str) -> str:
    """Compile-check a constraint without a tokenizer (cached): its grammar, or a
    ``ValueError`` naming the field and saying what is wrong."""
    key = _Key(kind, spec)
    with _grammar_lock:
        if key in _checked:
            _checked.move_to_end(key)
            return _checked[key]
    grammar = _grammar(kind, spec)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, limits=PARSER_LIMITS)
    if is_error:
        raise ValueError(f"structured_outputs.{kind}: {_first_line(messages[0])}")
    with _grammar_lock:
        _checked[key] = grammar
        while len(_checked) > GRAMMAR_CACHE_SIZE:
            _checked.popitem(last=False)
    return grammar


def _first_line(message: str) -> str:
    """llguidance's messages can quote the source over several lines; keep them
    readable in one error object."""
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip())


def _reason(matcher: llguidance.LLMatcher) -> str:
    """A failed matcher's reason, without llguidance's dump of its parser state."""
    detail = _first_line(matcher.get_error().split("<state>", 1)[0]).removesuffix(":")
    return f"{matcher.stop_reason()}: {detail}" if detail else matcher.stop_reason()


def _failure(matcher: llguidance.LLMatcher) -> str | None:
    """Why a probed matcher failed, or None for a dead end (no token can follow:
    llguidance's ``NoExtension``, reported as ``NoExtensionBias`` by its mask), which
    is the completion's to report, not a reason to refuse the grammar."""
    reason = _reason(matcher)
    return None if reason.split(": ")[-1] in ("NoExtension", "NoExtensionBias") else reason


class GrammarState:
    """A completion's matcher (module docstring). ``matcher`` is bound by the
    engine's `StructuredOutputManager`; ``consumed`` counts the output tokens fed
    to it."""

    def __init__(self, constraint: StructuredOutputs):
        self.constraint = constraint
        self.matcher: llguidance.LLMatcher | None = None
        self.consumed = 0
        self.mask: np.ndarray | None = None  # the last mask computed
        self.mask_at = -1  # how many output tokens there were when it was computed
        self.error: str | None = None  # why no token can follow, once it happened

    def __getstate__(self) -> dict[str, Any]:
        # the native matcher does not pickle; it is rebuilt from the output tokens
        return {"constraint": self.constraint, "error": self.error}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["constraint"])
        self.error = state["error"]

    def sync(self, output_token_ids: list[int]) -> None:
        """Feed the matcher the output tokens it has not consumed yet."""
        if self.error is not None:
            return
        if len(output_token_ids) < self.consumed:  # tokens were taken back: start over
            self.matcher.reset()
            self.consumed = 0
        new = output_token_ids[self.consumed:]
        if new and not self.matcher.consume_tokens(new):
            self.error = f"grammar: token {new[-1]} was not allowed ({_reason(self.matcher)})"
        self.consumed = len(output_token_ids)

    def refusal(self, token_id: int, num_output_tokens: int) -> str | None:
        """Why ``token_id``, sampled after ``num_output_tokens`` output tokens, must
        not be appended: the grammar had failed or allowed no token, or the mask
        computed for that position did not allow it; else None."""
        if self.error is not None:
            return self.error
        if self.mask_at == num_output_tokens and \
                not (int(self.mask[token_id >> 5]) >> (token_id & 31)) & 1:
            return f"grammar: token {token_id} is not allowed here"
        return None


class StructuredOutputManager:
    """Masks for the constrained rows of an engine's steps (module docstring).
    The llguidance tokenizer (seconds for a large vocabulary) is built on the
    first constrained request (at intake: `compile_constraint`)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...],
                 groups: Mapping[str, object] | None = None):
        """``groups``: the engine's groups by id; a tracked request whose group left
        them (migrated away) is dropped like a finished one."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        from sluice.runtime.sampler import mask_words  # the sampler imports SamplingParams,
        self.words = mask_words(vocab_size)            # which imports this module
        self._executor = llguidance.LLExecutor()
        self._groups = groups
        self._live: dict[str, Request] = {}  # the constrained requests in the engine

    def admit(self, requests: Iterable[Request]) -> None:
        """Track the constrained ones of a group's requests as the group enters
        the engine (queued, or adopted by migration)."""
        for r in requests:
            if r.grammar is not None and not r.is_finished:
                self._live[r.request_id] = r

    def token_masks(self, rows: Sequence[StepRow]) -> Callable[[], dict[int, np.ndarray]] | None:
        """The model runner's ``token_masks`` hook for a step over ``rows``: None
        while no tracked constrained request is live (the step does no grammar work
        per row), else one that masks the rows that sample (`Request.samples`)."""
        if not self._live:
            return None
        self._live = {rid: r for rid, r in self._live.items() if not r.is_finished and (
            self._groups is None or r.parent_id in self._groups)}
        if not self._live:
            return None
        return lambda: self.fill_masks(
            [s.request if s.request.samples(s.num_new_tokens) else None for s in rows])

    def matcher(self, constraint: StructuredOutputs) -> llguidance.LLMatcher:
        """A fresh matcher in the constraint's start state (a copy of the compiled one:
        `compile`)."""
        return compile_constraint(self.tokenizer, self.vocab_size, self.eos_token_ids,
                                  constraint).deep_copy()

    def fill_masks(self, requests: list[Request | None]) -> dict[int, np.ndarray]:
        """Masks by index into ``requests`` for those with a constraint (others, and
        None entries: rows that sample nothing, are unconstrained): each matcher
        first catches up with its request's output."""
        rows = [(i, r.grammar) for i, r in enumerate(requests)
                if r is not None and r.grammar is not None]
        if not rows:
            return {}
        out = np.zeros((len(rows), self.words), np.int32)
        live = []
        for k, (i, state) in enumerate(rows):
            if state.matcher is None and state.error is None:
                try:
                    state.matcher = self.matcher(state.constraint)
                except ValueError as e:
                    state.error = str(e)
            if state.error is None:
                state.sync(requests[i].output_token_ids)
            if state.error is None:
                live.append((state.matcher, k))
        if live:
            self._executor.unsafe_compute_mask_ptr(live, out.ctypes.data, self.words * 4,
                                                   len(rows))
        masks = {}
        for k, (i, state) in enumerate(rows):
            if state.error is None and state.matcher.is_error():
                state.error = ("grammar: no token can continue the output "
                               f"({_reason(state.matcher)})")
            if state.error is None and not out[k].any():
                state.error = "grammar: no token is allowed in this state"
            state.mask, state.mask_at = out[k], state.consumed
            masks[i] = out[k]
        return masks


class _Compiler:
    """A tokenizer's compiled constraints (see `compile`)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.ll_tokenizer = llguidance.LLTokenizer(
            tokenizer.hf.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids) or None)
        self.vocab_size, self.eos_token_ids = vocab_size, eos_token_ids
        self.compiled: collections.OrderedDict[_Key, llguidance.LLMatcher] = \
            collections.OrderedDict()
        self.lock = threading.Lock()

    def compile(self, constraint: StructuredOutputs) -> llguidance.LLMatcher:
        key = _Key(constraint.kind, constraint.spec)
        with self.lock:
            template = self.compiled.get(key)
            if template is not None:
                self.compiled.move_to_end(key)
                return template
        template = llguidance.LLMatcher(self.ll_tokenizer, _check(key.kind, key.spec),
                                        log_level=0, limits=PARSER_LIMITS)
        if template.is_error():
            raise ValueError(f"structured_outputs.{key.kind}: {_reason(template)}")
        # The first mask builds the lexer: the costly part. The probe then refuses a
        # grammar that hits a parser limit in its first tokens (module docstring).
        template.compute_bitmask()
        error = self._probe(template.deep_copy())
        if error is not None:
            raise ValueError(f"structured_outputs.{key.kind}: {error}")
        with self.lock:
            self.compiled[key] = template
            while len(self.compiled) > GRAMMAR_CACHE_SIZE:
                self.compiled.popitem(last=False)
        return template

    def _probe(self, matcher: llguidance.LLMatcher) -> str | None:
        """Walk ``matcher`` up to `PROBE_TOKENS` tokens down, taking the lowest
        allowed token that is not EOS each time: why it failed (a parser limit, a
        lexer error), or None. Reaching a state where no token (or only EOS) is
        allowed ends the walk without an error: a dead end is its completion's to
        report (finish reason ``"error"``), as it would be after any prefix."""
        eos = set(self.eos_token_ids)
        for _ in range(PROBE_TOKENS):
            words = np.frombuffer(matcher.compute_bitmask(), np.uint32)
            if matcher.is_error():
                return _failure(matcher)
            bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:self.vocab_size]
            token = next((int(t) for t in np.flatnonzero(bits) if int(t) not in eos), None)
            if token is None or not matcher.consume_token(token):
                return _failure(matcher) if matcher.is_error() else None
        return None


_compilers: collections.OrderedDict[tuple[int, int, tuple[int, ...]],
                                    tuple[Tokenizer, _Compiler]] = collections.OrderedDict()
_compilers_lock = threading.Lock()
COMPILERS_KEPT = 4  # tokenizers whose compiled constraints stay cached


def _compiler(tokenizer: Tokenizer, vocab_size: int,
              eos_token_ids: tuple[int, ...]) -> _Compiler:
    """The process's one `_Compiler` per tokenizer (the llguidance tokenizer takes
    seconds to build for a large vocabulary), shared by servers and engines."""
    key = (id(tokenizer), vocab_size, tuple(eos_token_ids))
    with _compilers_lock:
        held = _compilers.get(key)
        if held is None or held[0] is not tokenizer:
            held = _compilers[key] = (tokenizer, _Compiler(tokenizer, vocab_size,
                                                           tuple(eos_token_ids)))
            while len(_compilers) > COMPILERS_KEPT:
                _compilers.popitem(last=False)
        _compilers.move_to_end(key)
        return held[1]


def compile_constraint(tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...],
            constraint: StructuredOutputs) -> llguidance.LLMatcher:
    """The compiled matcher of ``constraint`` for ``tokenizer`` in its start state, its
    first mask computed (cached per tokenizer; not to be advanced: copy it). Called
    at intake (the server, on a worker thread) so an engine step finds it compiled; a
    grammar llguidance cannot build raises a ``ValueError`` naming the field."""
    return _compiler(tokenizer, vocab_size, eos_token_ids).compile(constraint)
