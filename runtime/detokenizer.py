"""Incremental detokenization: generated token ids -> streamable text, with stop strings.

Interface::

    d = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["\\n\\n"])
    for token_id in generated:
        if d.add_token(token_id):       # True: a stop string matched (finish_reason "stop")
            break
        send(d.take_delta())            # text that is safe to stream now
    send(d.take_delta(finished=True))   # everything that is left
    d.text, d.stop_reason               # the whole output, the stop string that matched

Why not ``tokenizer.decode(token_id)`` per token: one token may be part of a
character (byte-level BPE and byte-fallback vocabularies spell é, 你 or an emoji
in 2-4 tokens, each of which decodes to U+FFFD on its own), and a token's text
may depend on the token before it (SentencePiece ``▁`` pieces lose their leading
space when they come first in a decode). So each step decodes a short *window*
-- a few tokens of already-emitted context plus the tokens not yet read -- and
emits what the window's text adds to the context's text (the prefix/read-offset
method vLLM and TGI use). Trailing U+FFFD means a character is still being spelled
out: the text before it is emitted, the rest waits for more tokens. Once a window
ends in a complete character, the tokens just read become the next context, so
each step costs a decode of a few tokens, not of the whole output. The prompt's
last tokens are the first context, so the first generated token decodes as it
does inside the whole sequence.

``tokenizers.decoders.DecodeStream`` (0.23) does the same windowing, but it never
releases a trailing incomplete or invalid byte sequence (there is no flush, and
its state is not readable), so an output that ends mid-character would lose its
last bytes, and it withholds the whole text of a token that ends mid-character.

Deltas are exact -- their concatenation is the text a full decode gives -- for
decoders whose text for a prefix of the ids is a prefix of the text for all of
them: byte-level BPE, Metaspace, SentencePiece with byte fallback (as long as
runs of byte tokens are valid UTF-8). Text already streamed is never taken
back, so a decoder that rewrites earlier text (e.g. WordPiece's cleanup of
``" n't"``) can differ from a full decode there.

Stop strings are matched incrementally: each one keeps a Knuth-Morris-Pratt
state (how much of it the text ends with), advanced character by character over
the newly added text only, so a step costs O(new characters x stop strings)
however long the output or the stop strings are, and a match across token
boundaries is found at the token that completes it (the earliest-ending match
wins; among those, the longest). The same states say how long an end of the
text could still grow into a stop string: ``take_delta`` withholds it, so
streamed text never has to be taken back when the stop string is cut off.

Limits (a ``ValueError`` naming ``stop`` past them, a 400 over HTTP): at most
`MAX_STOP_STRINGS` stop strings of at most `MAX_STOP_STRING_CHARS` characters
each (OpenAI allows 4 and TGI defaults to 4; these leave room for vLLM-style
lists of stop words while bounding the tables every request carries).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from sluice.runtime.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context for the first generated token; the context is
# extended backwards (up to the maximum) while it would start inside a character.
PROMPT_CONTEXT_TOKENS = 5
MAX_PROMPT_CONTEXT_TOKENS = 32
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024


class IncrementalDetokenizer:
    """Decodes one request's generated tokens incrementally; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], *,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False,
                 skip_special_tokens: bool = True):
        check_stop_strings(stop)
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._tables = [_failure_table(s) for s in self._stop]
        self._states = [0] * len(self._stop)  # characters of each stop the text ends with
        self._include_stop = include_stop_str_in_output
        prompt = list(prompt_token_ids)
        # The window: context tokens (already emitted), then tokens not yet read.
        self._window = prompt[self._context_start(prompt):]
        self._read = len(self._window)  # index of the first unread token in the window
        self._read_chars = len(self._decode(self._window))  # window text already emitted
        self._text = ""
        self._sent = 0  # characters of text returned by take_delta
        self.stop_reason: str | None = None

    def __getstate__(self) -> dict:
        """Pickled without the tokenizer (a request moving to another process
        carries only its own state); the receiver calls `bind`."""
        return {**self.__dict__, "_tokenizer": None}

    def bind(self, tokenizer: Tokenizer) -> None:
        """Attach the (same) tokenizer after a move to another engine."""
        self._tokenizer = tokenizer

    @property
    def text(self) -> str:
        """The output text so far (cut at the stop string once one has matched)."""
        return self._text

    def add_token(self, token_id: int) -> bool:
        """Feed one generated token; True when a stop string has just matched."""
        if self.stop_reason is not None:
            raise RuntimeError("add_token: a stop string has already matched")
        self._window.append(token_id)
        return self._append(self._decode_new_text(flush=False))

    def take_delta(self, finished: bool = False) -> str:
        """The text not yet returned that is safe to stream.

        While not finished, a character still being spelled out and the end of
        the text that could begin a stop string are withheld. ``finished=True``
        releases everything, including a trailing incomplete or invalid byte
        sequence (as U+FFFD, as a full decode gives it).
        """
        if finished and self.stop_reason is None:
            self._append(self._decode_new_text(flush=True))
        end = len(self._text)
        if not finished and self.stop_reason is None:
            end -= self._partial_stop_len()
        delta = self._text[self._sent:end]
        self._sent = max(self._sent, end)
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _context_start(self, prompt: list[int]) -> int:
        """Where the prompt context starts: a few tokens back, not inside a character,
        and not at tokens that decode to nothing (skipped special tokens): after
        those, a SentencePiece ``▁`` piece would decode as if it came first and lose
        its space, which a full decode gives it after the text before them."""
        start = max(0, len(prompt) - PROMPT_CONTEXT_TOKENS)
        lowest = max(0, len(prompt) - MAX_PROMPT_CONTEXT_TOKENS)
        while start > lowest and (
                not (text := self._decode(prompt[start:])) or text.startswith(REPLACEMENT)):
            start -= 1
        return start

    def _decode_new_text(self, flush: bool) -> str:
        """Decode the window and return the text it adds; slide it when complete."""
        text = self._decode(self._window)
        complete = not text.endswith(REPLACEMENT)
        if not (complete or flush):
            text = text.rstrip(REPLACEMENT)  # a character is still being spelled out
        new = text[self._read_chars:]
        if complete and new:
            self._slide_window()
        else:
            self._read_chars = max(self._read_chars, len(text))
        return new

    def _slide_window(self) -> None:
        """The tokens just read become the context for the next ones."""
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._read_chars = len(self._decode(self._window))

    def _append(self, new: str) -> bool:
        """Add decoded text and look for a stop string ending in it; True on a match."""
        if not new:
            return False
        start = len(self._text)
        self._text += new
        return self._match_stop(start)

    def _match_stop(self, start: int) -> bool:
        """Advance the stop-string states over the text from ``start``; at the first
        character that completes one, cut the text there (see the module docstring)."""
        stops, tables, states = self._stop, self._tables, self._states
        if not stops:
            return False
        text = self._text
        for pos in range(start, len(text)):
            c = text[pos]
            done = None
            for j, s in enumerate(stops):
                k = states[j]
                while k and s[k] != c:
                    k = tables[j][k - 1]
                if s[k] == c:
                    k += 1
                if k == len(s):
                    if done is None or len(s) > len(stops[done]):
                        done = j
                    k = tables[j][k - 1]
                states[j] = k
            if done is not None:
                s = stops[done]
                self.stop_reason = s
                end = pos + 1
                self._text = text[:end if self._include_stop else end - len(s)]
                return True
        return False

    def _partial_stop_len(self) -> int:
        """Length of the longest end of the text that is a proper prefix of a stop string."""
        return max(self._states, default=0)


def check_stop_strings(stop: Sequence[str]) -> None:
    """Raise ``ValueError`` (naming ``stop``) unless the stop strings are within the limits."""
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for s in stop:
        if not s:
            raise ValueError("stop: stop strings must not be empty")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stop: a stop string may have at most {MAX_STOP_STRING_CHARS} "
                             f"characters, got {len(s)}")


@functools.lru_cache(maxsize=1024)
def _failure_table(s: str) -> tuple[int, ...]:
    """KMP failure function: ``t[i]`` = length of the longest proper prefix of
    ``s[:i + 1]`` that is also its suffix (cached: siblings share their stop strings)."""
    t = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = t[k - 1]
        if s[i] == s[k]:
            k += 1
        t[i] = k
    return tuple(t)
