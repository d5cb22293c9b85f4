"""Incremental detokenization: text deltas that are always whole UTF-8 characters and never show a stop string."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete multi-byte character


class IncrementalDetokenizer:
    """Push token ids one at a time; get back the text that is safe to show.

    New text is read as ``decode(ids[prefix:]) - decode(ids[prefix:read])`` (a window that keeps the
    decoder's context, e.g. a word's leading space) and held back while it ends in an incomplete
    character. The final text is exactly the concatenation of what was produced, so a stream and a
    whole completion always agree. A tail that could still grow into a stop string is held back too;
    a completed stop string ends the text and is not included.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None,
                 hidden: set[int] | frozenset[int] = frozenset()) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.hidden = hidden  # ids never shown (media markers: as text they would read back as placeholders)
        self.stop = [StopMatcher(s) for s in dict.fromkeys(stop or []) if s]
        self.matched = 0  # how much of self.text the stop matchers have read
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""  # everything produced so far (after a stop: up to the stop string)
        self.released = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self.hidden:
            ids = [t for t in ids if t not in self.hidden]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _produce(self, final: bool) -> None:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, token_id: int) -> str:
        if self.stopped:  # the text ended at a stop string: nothing after it is shown
            return ""
        self.ids.append(token_id)
        self._produce(final=False)
        return self._release()

    def flush(self) -> str:
        """The sequence has ended: produce and release everything still held."""
        if not self.stopped:
            self._produce(final=True)
        return self._release(hold=False)

    def _release(self, hold: bool = True) -> str:
        """Release what is safe to show: the matchers read only the text added since the last call (linear in the
        text however many and long the stop strings), a completed stop string cuts the text where it began, and a
        tail that may still grow into one is held back."""
        new, self.matched = self.text[self.matched :], len(self.text)
        for i, ch in enumerate(new):
            done = [m for m in self.stop if m.feed(ch)]
            if done:
                self.stopped, hold = True, False
                end = len(self.text) - len(new) + i + 1
                self.text = self.text[: end - max(len(m.text) for m in done)]
                break
        safe = len(self.text)
        if hold and self.stop:
            safe -= max(m.state for m in self.stop)
        safe = max(safe, self.released)
        out = self.text[self.released : safe]
        self.released = safe
        return out


class StopMatcher:
    """Knuth-Morris-Pratt over a stream: `state` is the length of the longest prefix of the stop string that the
    text read so far ends with, so each character costs amortised O(1) and the held-back tail is `state` long."""

    def __init__(self, text: str) -> None:
        self.text, self.state = text, 0
        self.fail = fail = [0] * len(text)  # fail[i]: the longest proper border of text[: i + 1]
        k = 0
        for i in range(1, len(text)):
            while k and text[i] != text[k]:
                k = fail[k - 1]
            if text[i] == text[k]:
                k += 1
            fail[i] = k

    def feed(self, ch: str) -> bool:
        """Read one character; True when the stop string has just been completed."""
        k, text = self.state, self.text
        while k and ch != text[k]:
            k = self.fail[k - 1]
        if ch == text[k]:
            k += 1
        if k == len(text):
            self.state = self.fail[k - 1]
            return True
        self.state = k
        return False
