"""A sliding anti-replay window for the explicit 64-bit counters of TRANSPORT messages.

Datagrams arrive lost, duplicated and out of order; each carries its sender's counter in clear
(``transport.wire``: TRANSPORT). A receiver accepts a counter at most once and only if it is no
older than :data:`WINDOW` counters behind the highest one it has accepted — the scheme of IPsec
(RFC 4303 section 3.4.3) and WireGuard (section 5.4.6), kept the way RFC 6479 describes:

* the window is a ring of 64-bit words (here Python ints used as 64-bit fields); bit ``c % 64``
  of word ``(c // 64) % WORDS`` says whether counter ``c`` has been seen;
* when the highest counter moves into a new word, only the words it skipped over are cleared
  (RFC 6479 section 2, "the bitmap is not shifted"): accepting a packet costs O(1) whatever the
  jump, with at most ``WORDS`` words cleared on a far jump;
* one word more than ``WINDOW / 64`` is kept, so the whole window fits even when it does not
  start on a word boundary (RFC 6479 section 2: "one more block is needed").

::

        word 0           word 1                       word 128  (ring of 129 words)
    +----------------+----------------+--  ...  --+----------------+
    |bits 0..63      |bits 64..127    |           |bits 8192..8255 |
    +----------------+----------------+--  ...  --+----------------+
                   ^ top - WINDOW + 1                   ^ top  (highest accepted)

Callers authenticate first and record afterwards: :meth:`ReplayWindow.check` is a cheap look
(skip the AEAD for an obvious replay), :meth:`ReplayWindow.accept` records the counter once the
packet has proven authentic (a forged packet must not move the window).
"""

from __future__ import annotations

WINDOW = 8192  # counters accepted behind the highest one, inclusive of it
_WORD_BITS = 64
WORDS = WINDOW // _WORD_BITS + 1  # RFC 6479: one extra word for a window off a word boundary


class ReplayWindow:
    """Which counters have been accepted, within the last :data:`WINDOW` (RFC 6479)."""

    __slots__ = ("_bitmap", "_top")

    def __init__(self) -> None:
        self._bitmap = [0] * WORDS
        self._top = -1  # the highest counter accepted; -1 before the first

    @property
    def top(self) -> int:
        """The highest counter accepted so far (-1 if none)."""
        return self._top

    def check(self, counter: int) -> bool:
        """Whether ``counter`` would be accepted now; changes nothing."""
        if counter < 0:
            return False
        top = self._top
        if counter > top:
            return True
        if top - counter >= WINDOW:
            return False  # too old: behind the window
        return not (self._bitmap[(counter >> 6) % WORDS] >> (counter & 63)) & 1

    def accept(self, counter: int) -> bool:
        """Record ``counter`` and say True; or say False (a replay, too old), changing nothing."""
        if counter < 0:
            return False
        top = self._top
        bitmap = self._bitmap
        if counter > top:
            # Clear the words the window moves over, no more than the whole ring (RFC 6479 sec. 2).
            current = top >> 6  # -1 >> 6 == -1: nothing seen yet
            new = counter >> 6
            for step in range(1, min(new - current, WORDS) + 1):
                bitmap[(current + step) % WORDS] = 0
            self._top = counter
        elif top - counter >= WINDOW:
            return False
        index = (counter >> 6) % WORDS
        bit = 1 << (counter & 63)
        word = bitmap[index]
        if word & bit:
            return False
        bitmap[index] = word | bit
        return True
