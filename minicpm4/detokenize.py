"""Token-to-text conversion for the MiniCPM4 tokenizer: piece decoding and streaming.

Responsibility: turn token pieces back into text exactly as the fast (``tokenizers``) decoder
of this SentencePiece-style vocabulary does, and emit text incrementally while a model
generates, without ever producing half a UTF-8 character (spec §1.2 lists the special tokens
that streaming skips by default).

Decoding rules (shared by both backends of :mod:`minicpm4.tokenizer`):

1. every '▁' (U+2581) in a piece becomes a space;
2. runs of byte-fallback pieces ``<0xNN>`` are joined and decoded as UTF-8; a run that is not
   valid UTF-8 becomes one U+FFFD per byte (the ``tokenizers`` ByteFallback rule);
3. all pieces are concatenated, then one leading space (the dummy prefix that encoding adds) is
   removed from the start of the whole text.

:class:`StreamDetokenizer` keeps a small window of recent ids ("prefix offset / read offset"):
each push decodes only that window, so the cost per token is O(window), not O(sequence).
"""

from __future__ import annotations

import operator
from typing import Iterable, Protocol, Sequence

_REPLACEMENT = "\ufffd"
_SPACE_MARK = "\u2581"


def check_token_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """``ids`` as a list of ints in ``[0, vocab_size)``; ValueError otherwise."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"token ids must be a sequence of ints, got {type(ids).__name__}")
    out = []
    for tid in ids:
        try:
            value = operator.index(tid) if not isinstance(tid, bool) else None
        except TypeError:
            value = None
        if value is None:
            raise ValueError(f"token id must be an int, got {tid!r}")
        if not 0 <= value < vocab_size:
            raise ValueError(f"token id {value} out of range [0, {vocab_size})")
        out.append(value)
    return out


def byte_of_piece(piece: str) -> int | None:
    """The byte value of a byte-fallback piece such as ``<0xE4>``, else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


def pieces_to_text(pieces: Iterable[str], *, strip_leading_space: bool = True) -> str:
    """Decode token pieces to text with the rules in the module docstring."""
    out: list[str] = []
    pending = bytearray()

    def flush_bytes() -> None:
        if pending:
            try:
                out.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(_REPLACEMENT * len(pending))
            pending.clear()

    for piece in pieces:
        value = byte_of_piece(piece)
        if value is not None:
            pending.append(value)
            continue
        flush_bytes()
        out.append(piece.replace(_SPACE_MARK, " "))
    flush_bytes()
    text = "".join(out)
    if strip_leading_space and text.startswith(" "):
        text = text[1:]
    return text


class _Decoder(Protocol):
    """What :class:`StreamDetokenizer` needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_token_ids(self) -> frozenset[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


_ANCHOR_CANDIDATES = ("a", "x", "0", "A", "the", "I")
_MAX_HELD = 4  # a UTF-8 character spans at most 4 byte-fallback tokens
_CONTEXT_TAIL = 6  # context ids kept in the window


class StreamDetokenizer:
    """Incremental detokenizer: ``push`` ids one at a time, get newly finalized text back.

    The concatenation of every ``push`` result and the final ``flush`` equals
    ``tokenizer.decode(all_ids, skip_special_tokens=...)``. Text is held back while the window
    ends in U+FFFD, i.e. while a multi-byte character is still split over byte-fallback tokens
    (at most 3 trailing byte tokens; 4 that still fail are invalid UTF-8 and are let through).

    The window holds the ids from the "prefix offset" on; ``window[:read]`` was already
    emitted. Each push decodes only the window, then slides the prefix offset to the old read
    offset. Skipped special tokens never enter the window: decode drops them before joining.

    Leading space: the decoder drops one space at the start of the *whole* text (the dummy
    prefix). A window that does not start the text must keep its leading space, so it is
    decoded behind a fixed anchor piece (e.g. 'a') whose text is then cut off.

    ``context_ids`` (e.g. the prompt) are not emitted; they make the first pushed tokens decode
    in context, e.g. keep the leading space of a first generated '▁word'. The pushes then
    add up to ``decode(context + ids)[len(decode(context)):]``.
    """

    def __init__(self, tokenizer: _Decoder, *, skip_special_tokens: bool = True,
                 context_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._special = tokenizer.special_token_ids
        self._anchor_id, self._anchor_text = self._find_anchor(tokenizer)
        byte_ids = (tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self._byte_ids = frozenset(t for t in byte_ids if t is not None)
        visible = [t for t in check_token_ids(context_ids, tokenizer.vocab_size) if self._visible(t)]
        self._window: list[int] = visible[-_CONTEXT_TAIL:]  # ids from the prefix offset on
        self._read = len(self._window)  # window[:_read] has been emitted (or is context)
        self._text_before = len(visible) > len(self._window)  # visible ids precede the window
        self._prefix_text = self._decode(self._window)  # decoded text of window[:_read]
        self._num_tokens = 0

    @staticmethod
    def _find_anchor(tokenizer: _Decoder) -> tuple[int, str]:
        for text in _ANCHOR_CANDIDATES:
            tid = tokenizer.token_to_id(text)
            if tid is None or tid in tokenizer.special_token_ids:
                continue
            if tokenizer.decode([tid], skip_special_tokens=True) == text:
                return tid, text
        raise ValueError("tokenizer has no plain piece usable as a decode anchor")

    @property
    def num_tokens(self) -> int:
        """How many ids were pushed so far."""
        return self._num_tokens

    def _visible(self, token_id: int) -> bool:
        return not (self._skip and token_id in self._special)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if not self._text_before:
            return self._tok.decode(ids, skip_special_tokens=self._skip)
        text = self._tok.decode([self._anchor_id, *ids], skip_special_tokens=self._skip)
        return text[len(self._anchor_text):]

    def push(self, token_id: int) -> str:
        """Add one id; return the text it finalizes ('' while a character is incomplete)."""
        (token_id,) = check_token_ids([token_id], self._tok.vocab_size)
        self._num_tokens += 1
        if not self._visible(token_id):
            return ""
        self._window.append(token_id)
        new_text = self._decode(self._window)
        if len(new_text) <= len(self._prefix_text) or (new_text.endswith(_REPLACEMENT) and self._held() < _MAX_HELD):
            return ""
        chunk = new_text[len(self._prefix_text):]
        self._text_before = self._text_before or self._read > 0
        self._window = self._window[self._read:]  # new prefix offset = old read offset
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return chunk

    def _held(self) -> int:
        """Trailing unread byte-fallback tokens (a valid character needs at most 3 held ones)."""
        held = 0
        for tid in reversed(self._window[self._read:]):
            if tid not in self._byte_ids:
                break
            held += 1
        return held

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Push several ids; return the text they finalize."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete byte sequence comes out as U+FFFD)."""
        if self._read == len(self._window):
            return ""
        new_text = self._decode(self._window)
        chunk = new_text[len(self._prefix_text):]
        self._prefix_text = new_text
        self._read = len(self._window)
        return chunk
