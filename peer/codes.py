"""Transfer codes: the short secret that one person reads aloud and the other types.

A code is a nameplate number and a few words drawn with the OS CSPRNG from the EFF large
wordlist, joined with dashes, e.g. ``417-cobalt-lemon-unicycle``. Only ``a-z``, digits and
``-`` appear, so a code survives being spoken, retyped, and pasted into a shell unquoted. On
the wire the whole code is simply the password fed to PBKDF2 (docs/protocol.md §5.2).

The nameplate is public: the sender writes it into its spoke salt so that our receivers only
run handshakes with the sender they are looking for (see ``peer.handshake.nameplate_of``). The
secret is the words alone, and they carry the entropy counted here.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
import secrets

import attrs

SEPARATOR = "-"
DEFAULT_WORDS = 3
NAMEPLATES = range(100, 1000)
"""Three digits: short to read aloud, and a stranger on a busy relay shares ours rarely."""
# A receiver may try one guess per handshake against a waiting sender, so a code must
# not be guessable in any realistic number of handshakes.
MIN_ENTROPY_BITS = 32
WORDLIST_FILE = "eff_large.txt"

# Suggest a replacement word only when it is this close: further away, a "did you
# mean" is more likely to mislead than help.
_MAX_SUGGESTION_DISTANCE = 2
_CODE_WORD = re.compile(r"[a-z]+")
_SEPARATOR_RUN = re.compile(r"[\s\-]+")
_NAMEPLATE = re.compile(r"[0-9]{1,5}")


@functools.cache
def load_wordlist() -> tuple[str, ...]:
    """The words codes are made of, read once from the package data."""
    resource = importlib.resources.files("peer") / "words" / WORDLIST_FILE
    lines = resource.read_text(encoding="ascii").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


@functools.cache
def _word_set() -> frozenset[str]:
    return frozenset(load_wordlist())


def code_entropy_bits(words: int = DEFAULT_WORDS) -> float:
    """log2 of the number of distinct codes of this many words."""
    if words < 1:
        raise ValueError(f"a code needs at least one word, not {words}")
    return words * math.log2(len(load_wordlist()))


def generate_code(words: int = DEFAULT_WORDS) -> str:
    """A fresh random code; refuses lengths below MIN_ENTROPY_BITS."""
    bits = code_entropy_bits(words)
    if bits < MIN_ENTROPY_BITS:
        raise ValueError(
            f"{words} words give only {bits:.1f} bits; codes need {MIN_ENTROPY_BITS}"
        )
    wordlist = load_wordlist()
    nameplate = NAMEPLATES[secrets.randbelow(len(NAMEPLATES))]
    return SEPARATOR.join([str(nameplate)] + [secrets.choice(wordlist) for _ in range(words)])


def normalize_code(text: str) -> str:
    """Forgive what people do when typing a code they heard.

    Case is dropped, surrounding whitespace is stripped, and any run of spaces and
    dashes becomes one dash. Unknown words are kept: the same function sees passwords
    that are not our codes. Both ends must apply it (or neither), since the result is
    the PBKDF2 password byte for byte.
    """
    parts = _SEPARATOR_RUN.split(text.strip().lower())
    return SEPARATOR.join(part for part in parts if part)


def password_bytes(text: str) -> bytes:
    """The exact PBKDF2 password for what a user typed or passed with ``--password``.

    Text that is one of our codes once normalised (an optional nameplate, then known words)
    is normalised, so "417 Cobalt lemon-unicycle" works. Anything else, such as a bob
    password or a user's own passphrase, is used as typed (only surrounding whitespace is
    dropped): changing its case or spaces would turn a right password into a wrong one.
    """
    stripped = text.strip()
    normal = normalize_code(stripped)
    parts = normal.split(SEPARATOR)
    if parts and _NAMEPLATE.fullmatch(parts[0]):
        parts = parts[1:]
    known = _word_set()
    if parts and all(part in known for part in parts):
        return normal.encode()
    return stripped.encode()


def _words_of(text: str) -> list[str]:
    parts = normalize_code(text).split(SEPARATOR)
    if parts and _NAMEPLATE.fullmatch(parts[0]):
        return parts[1:]
    return parts


def check_code(text: str) -> str | None:
    """A friendly warning if ``text`` looks like one of our codes with a mistyped word.

    Returns None when every word is known, or when the text does not look like a code
    at all (fewer words than any code we generate, non-letters, or no known word, as
    with bob's generated passwords or a user's own), so other passwords pass silently.
    """
    parts = _words_of(text)
    if len(parts) < _min_code_words() or not all(_CODE_WORD.fullmatch(p) for p in parts):
        return None
    known = _word_set()
    unknown = [part for part in parts if part not in known]
    if not unknown or len(unknown) == len(parts):
        return None
    notes = []
    for word in unknown:
        suggestion = closest_word(word)
        if suggestion is None:
            notes.append(f"'{word}' is not in the word list")
        else:
            notes.append(f"'{word}' is not in the word list (did you mean '{suggestion}'?)")
    return "; ".join(notes)


@attrs.frozen
class Suspect:
    """A code shaped like the ones we generate, with words outside the list.

    Trying it would most likely spend one of the sender's few attempts on a typo, so the
    receiver asks first (or, without a terminal, refuses and names the correction).
    """

    typed: str
    unknown: tuple[str, ...]
    correction: str | None
    """The code with each unknown word replaced by its closest list word; None when one of
    them has no close word (then there is nothing sensible to offer)."""

    def describe(self) -> str:
        if self.correction is None:
            return check_code(self.typed) or ""
        words = " and ".join(f"'{word}'" for word in self.unknown)
        return f"{words} {'is' if len(self.unknown) == 1 else 'are'} not in the word list"


def review_code(text: str) -> Suspect | None:
    """Whether ``text`` should be questioned before it is tried.

    The rule, which lets a sender's own ``--password`` through: the text is questioned only
    when it has the shape of a generated code, a nameplate (1 to 5 digits) then at least as
    many words as our shortest code, all of them letters, at least one in the list, and
    some not. Anything else (no nameplate, digits or punctuation inside, no list word at
    all) is a password someone chose and is used as typed. A chosen password that happens
    to have our shape can still be used: answer no to the correction, or ``--as-typed``.
    """
    parts = normalize_code(text).split(SEPARATOR)
    if len(parts) < 2 or not _NAMEPLATE.fullmatch(parts[0]):
        return None
    nameplate, words = parts[0], parts[1:]
    if len(words) < _min_code_words() or not all(_CODE_WORD.fullmatch(w) for w in words):
        return None
    known = _word_set()
    unknown = tuple(w for w in words if w not in known)
    if not unknown or len(unknown) == len(words):
        return None
    fixed = [w if w in known else closest_word(w) for w in words]
    correction = None if None in fixed else SEPARATOR.join([nameplate, *fixed])
    return Suspect(text.strip(), unknown, correction)


def completions(prefix: str) -> list[str]:
    """The list words starting with ``prefix`` (what Tab offers in the ``Code:`` prompt)."""
    prefix = prefix.lower()
    return [word for word in load_wordlist() if word.startswith(prefix)]


def closest_word(word: str) -> str | None:
    """The list word with the smallest edit distance to ``word``, if it is close enough.

    Ties go to the word that comes first alphabetically, so the hint is stable.
    """
    best, best_distance = None, _MAX_SUGGESTION_DISTANCE + 1
    for candidate in load_wordlist():
        if abs(len(candidate) - len(word)) >= best_distance:
            continue
        distance = _edit_distance(word, candidate, limit=best_distance - 1)
        if distance < best_distance:
            best, best_distance = candidate, distance
    return best


def _min_code_words() -> int:
    return math.ceil(MIN_ENTROPY_BITS / math.log2(len(load_wordlist())))


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) turning a into b.

    Swaps count as one edit because "lemno" for "lemon" is the typical slip. Gives
    up early and returns ``limit + 1`` once the distance must exceed ``limit``.
    """
    previous_previous: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous_previous[j - 2] + 1)
        # Any later cell is at least min(this row, the row before + 1).
        if min(current) > limit and min(previous) >= limit:
            return limit + 1
        previous_previous, previous = previous, current
    return min(previous[-1], limit + 1)
