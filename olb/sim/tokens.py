"""Deterministic text: token pieces, prompt token counts, context ids.

Theory of operation: generating text per token in Python would cost a random
draw and a JSON escape per line.  Instead, one corpus of CORPUS_LEN token
pieces is built per seed (once, cached), each piece stored pre-escaped as
Go's json.Marshal writes it.  A request's text is a window of the corpus that
starts at a sentence boundary chosen by hashing (seed, model, prompt,
options.seed): the same request always gets the same text, different prompts
get different text, and producing a token is one index.

The vocabulary deliberately includes pieces that exercise a proxy: a
multi-byte UTF-8 word, a double quote and a backslash (escaped in JSON), and
paragraph breaks ("\\n\\n" inside a JSON string -- never a raw newline, which
would split an NDJSON line).
"""

from __future__ import annotations

import functools
import hashlib
import random

from olb.sim.gojson import go_string

CORPUS_LEN = 8192

_WORDS = (
    "the", "a", "model", "request", "answer", "light", "sky", "blue", "is", "of", "and", "to", "in",
    "that", "it", "with", "as", "for", "on", "was", "by", "this", "be", "are", "from", "at", "or",
    "an", "which", "one", "we", "can", "all", "there", "their", "has", "more", "when", "will",
    "would", "time", "other", "these", "some", "into", "than", "its", "two", "first", "water",
    "called", "long", "down", "day", "made", "part", "over", "new", "sound", "only", "little",
    "work", "know", "place", "years", "live", "back", "give", "most", "very", "after", "things",
    "our", "just", "name", "good", "sentence", "man", "think", "say", "great", "where", "help",
    "through", "much", "before", "line", "right", "too", "means", "old", "any", "same", "tell",
    "boy", "follow", "came", "want", "show", "also", "around", "form", "three", "small", "set",
    "put", "end", "does", "another", "well", "large", "must", "big", "even", "such", "because",
    "turn", "here", "why", "ask", "went", "men", "read", "need", "land", "different", "home",
    "us", "move", "try", "kind", "hand", "picture", "again", "change", "off", "play", "spell",
    "air", "away", "animal", "house", "point", "page", "letter", "mother", "found", "study",
    "still", "learn", "should", "world", "high", "every", "near", "add", "food", "between",
    "own", "below", "country", "plant", "last", "school", "father", "keep", "tree", "never",
    "start", "city", "earth", "eyes", "scattering", "Rayleigh", "wavelength", "atmosphere",
    "molecules", "shorter", "photons", "sunlight", "balancer", "backend", "token", "stream",
    "café", "naïve", "über", "latency", "throughput", "GPU", "cache", "queue", "slot",
)

# Inner punctuation and quoting pieces, drawn between words now and then.
_INNER = (",", ",", ";", " \"", "\"", " (", ")", " -", "\\")


@functools.lru_cache(maxsize=8)
def corpus(seed: int) -> "Corpus":
    return Corpus(seed)


class Corpus:
    """CORPUS_LEN token pieces from one seed, with sentence-start offsets."""

    __slots__ = ("texts", "escaped", "ids", "starts", "first_escaped", "first_texts")

    def __init__(self, seed: int):
        rng = random.Random(f"olb-sim-corpus/{seed}")
        words = _WORDS
        texts: list[str] = []
        ids: list[int] = []
        starts: list[int] = []
        while len(texts) < CORPUS_LEN:
            starts.append(len(texts))
            n = rng.randint(5, 16)
            for i in range(n):
                w = rng.randrange(len(words))
                word = words[w]
                if i == 0:
                    word = word[:1].upper() + word[1:]
                texts.append(" " + word)
                ids.append(1000 + w)
                if 0 < i < n - 1 and rng.random() < 0.06:
                    p = rng.randrange(len(_INNER))
                    texts.append(_INNER[p])
                    ids.append(500 + p)
            end = rng.random()
            if end < 0.12:
                texts.append(".\n\n")
                ids.append(271)
            elif end < 0.2:
                texts.append("?")
                ids.append(30)
            else:
                texts.append(".")
                ids.append(13)
        # A window may wrap past the end; sentence starts keep it readable.
        self.texts = texts[:CORPUS_LEN]
        self.ids = ids[:CORPUS_LEN]
        self.starts = [s for s in starts if s < CORPUS_LEN]
        self.escaped = [go_string(t) for t in self.texts]
        # The first piece of a response has no leading space.
        self.first_texts = {s: self.texts[s].lstrip(" ") for s in self.starts}
        self.first_escaped = {s: go_string(t) for s, t in self.first_texts.items()}

    def offset(self, *key) -> int:
        """A sentence start chosen by hashing `key` (stable across processes)."""
        h = hashlib.blake2b(repr(key).encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return self.starts[int.from_bytes(h, "little") % len(self.starts)]

    def piece(self, offset: int, i: int) -> bytes:
        """Token i of the window at `offset`, JSON-escaped with its quotes."""
        if i == 0:
            return self.first_escaped[offset]
        return self.escaped[(offset + i) % CORPUS_LEN]

    def text(self, offset: int, n: int) -> str:
        """The first n tokens of the window at `offset`, joined."""
        if n <= 0:
            return ""
        end = offset + n
        if end <= CORPUS_LEN:
            rest = self.texts[offset + 1:end]
        else:
            rest = self.texts[offset + 1:] + self.texts[:end - CORPUS_LEN]
        return self.first_texts[offset] + "".join(rest)

    def tokens_in(self, offset: int, prefix: str) -> int | None:
        """k when `prefix` is text(offset, k) -- the first k tokens of the
        window -- else None (a prefill the window does not start with)."""
        if not prefix:
            return 0
        k, size = 0, 0
        while size < len(prefix) and k < CORPUS_LEN:
            piece = self.first_texts[offset] if k == 0 else self.texts[(offset + k) % CORPUS_LEN]
            if not prefix.startswith(piece, size):
                return None
            size += len(piece)
            k += 1
        return k if size == len(prefix) else None

    def token_ids(self, offset: int, n: int) -> list:
        end = offset + n
        if end <= CORPUS_LEN:
            return self.ids[offset:end]
        return self.ids[offset:] + self.ids[:end - CORPUS_LEN]


def count_prompt_tokens(text: str, overhead: int) -> int:
    """Prompt tokens: ~4 characters per token (the usual BPE rule of thumb)
    plus the chat template's fixed tokens (`overhead`)."""
    return (len(text) + 3) // 4 + overhead


def prompt_ids(text: str, n: int) -> list:
    """Stand-in token ids for a prompt (the `context` array of /api/generate)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return [128000] + [(h + i * 2654435761) % 120000 + 100 for i in range(n - 1)] if n > 0 else []
