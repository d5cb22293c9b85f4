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
        self.stop = [s for s in (stop or []) if s]
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
        self.ids.append(token_id)
        self._produce(final=False)
        return self._release()

    def flush(self) -> str:
        """The sequence has ended: produce and release everything still held."""
        if not self.stopped:
            self._produce(final=True)
        return self._release(hold=False)

    def _release(self, hold: bool = True) -> str:
        for s in self.stop:
            at = self.text.find(s, max(0, self.released - len(s) + 1))
            if at != -1:
                self.stopped = True
                self.text = self.text[:at]
                hold = False
        safe = len(self.text)
        if hold:
            for s in self.stop:  # a tail that may be the start of a stop string waits
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[safe - k : safe] == s[:k]:
                        safe -= k
                        break
        safe = max(safe, self.released)
        out = self.text[self.released : safe]
        self.released = safe
        return out
