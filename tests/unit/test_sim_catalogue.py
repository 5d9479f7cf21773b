"""olb.sim.catalogue and olb.sim.tokens: names, model facts, deterministic text."""

import orjson
import pytest

from olb.sim.catalogue import KNOWN_MODELS, Catalogue, known_spec, normalize_name, parse_name
from olb.sim.tokens import CORPUS_LEN, corpus, count_prompt_tokens, prompt_ids


@pytest.mark.parametrize("given, shown", [
    ("llama3.2", "llama3.2:latest"),
    ("llama3.2:latest", "llama3.2:latest"),
    ("library/llama3.2", "llama3.2:latest"),
    ("registry.ollama.ai/library/llama3.2:latest", "llama3.2:latest"),
    ("REGISTRY.OLLAMA.AI/Library/llama3.2", "llama3.2:latest"),
    ("http://llama3.2:3b", "llama3.2:3b"),
    ("llama3.2:3b+Q4_0", "llama3.2:3b"),
    ("llama3.2@sha256-" + "a" * 64, "llama3.2:latest"),
    ("jmorganca/mistral", "jmorganca/mistral:latest"),
    ("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M", "hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M"),
    ("example.com/library/x", "example.com/library/x:latest"),
])
def test_display_shortest_keeps_the_tag(given, shown):
    assert normalize_name(given) == shown


@pytest.mark.parametrize("bad", [
    "", "a..b", "a/b/c/d", "a:b:c", "bad name", "x" * 129, "ns.dot/model", "model:", "/model",
    "model@sha256-abc", "a:b/c", "model+", "model++x", None, 5,
])
def test_invalid_names(bad):
    assert parse_name(bad) is None


def test_names_compare_case_insensitively_but_keep_case():
    a, b = parse_name("Llama3.2"), parse_name("library/llama3.2:LATEST")
    assert a.key == b.key
    assert a.display == "Llama3.2:latest"
    assert a.full == "registry.ollama.ai/library/Llama3.2:latest"


def test_known_specs_are_consistent():
    for name, spec in KNOWN_MODELS.items():
        assert normalize_name(name) == name
        assert len(spec.digest) == 64 and int(spec.digest, 16) >= 0
        assert spec.embedding_length % spec.head_count == 0
        assert spec.details()["families"] == [spec.architecture]
        info = spec.model_info()
        assert info[f"{spec.architecture}.context_length"] == spec.context_length
    # 2 x 32 layers x 8 kv heads x 128 head dim x 2 bytes: llama 3 8B keeps 128 KiB of f16 KV per token.
    assert KNOWN_MODELS["llama3.1:8b"].kv_bytes_per_token() == 128 * 1024
    assert KNOWN_MODELS["nomic-embed-text:latest"].embedding_only
    assert not KNOWN_MODELS["llama3.2:latest"].embedding_only
    assert len({s.digest for s in KNOWN_MODELS.values()}) == len(KNOWN_MODELS)


def test_known_spec_by_any_spelling():
    assert known_spec("LLAMA3.2").name == "llama3.2:latest"
    assert known_spec("library/qwen2.5:7b").name == "qwen2.5:7b"
    assert known_spec("nope") is None
    assert known_spec("") is None


def test_catalogue_install_lookup_remove():
    cat = Catalogue.from_models(("llama3.2:latest", "nomic-embed-text:latest"), base_time=1_700_000_000)
    assert [e.name.display for e in cat.listing()] == ["llama3.2:latest", "nomic-embed-text:latest"]
    assert cat.lookup(parse_name("LLAMA3.2")).spec is KNOWN_MODELS["llama3.2:latest"]
    copy = cat.install(KNOWN_MODELS["llama3.2:latest"], 1_700_000_100, name=parse_name("mine/x:1"))
    assert cat.listing()[0] is copy
    assert cat.remove(parse_name("mine/x:1"))
    assert not cat.remove(parse_name("mine/x:1"))
    with pytest.raises(ValueError, match="unknown model"):
        Catalogue.from_models(("nope:latest",), base_time=0)


def test_corpus_is_deterministic_per_seed():
    a, b, c = corpus(1), corpus(1), corpus(2)
    assert a is b
    assert a.texts != c.texts
    assert len(a.texts) == CORPUS_LEN == len(a.escaped) == len(a.ids)
    off = a.offset("model", "prompt")
    assert off == a.offset("model", "prompt") and off in a.starts
    assert off != a.offset("model", "another prompt") or off != a.offset("model", "third")


def test_pieces_are_go_json_and_join_to_the_text():
    c = corpus(0)
    for off in c.starts[:50] + [c.starts[-1]]:
        n = 300  # wraps past the end for the last start
        pieces = [orjson.loads(c.piece(off, i)) for i in range(n)]
        assert not pieces[0].startswith(" ")
        assert "".join(pieces) == c.text(off, n)
        assert len(c.token_ids(off, n)) == n
        for i in range(n):
            raw = c.piece(off, i)
            assert b"\n" not in raw and raw.startswith(b'"') and raw.endswith(b'"')
    # The vocabulary exercises escaping and UTF-8.
    joined = c.text(c.starts[0], CORPUS_LEN - 1)
    assert '"' in joined and "\\" in joined and "\n\n" in joined and "é" in joined


def test_prompt_token_counts():
    assert count_prompt_tokens("", 0) == 0
    assert count_prompt_tokens("abcd", 0) == 1
    assert count_prompt_tokens("abcde", 20) == 22
    ids = prompt_ids("hello", 5)
    assert ids[0] == 128000 and len(ids) == 5 and ids == prompt_ids("hello", 5)
    assert prompt_ids("x", 0) == []


def test_tokens_in_finds_how_far_a_prefill_reaches_into_the_window():
    """Corpus.tokens_in: how many of the window's tokens a prefill holds
    (olb-sim's _chat continues an assistant prefill after them)."""
    c = corpus(7)
    for offset in (c.starts[0], c.starts[5], c.starts[-1]):   # the last one wraps past CORPUS_LEN
        for k in (0, 1, 2, 17, 40):
            assert c.tokens_in(offset, c.text(offset, k)) == k
        text = c.text(offset, 6)
        if len(text) - len(c.text(offset, 5)) > 1:
            assert c.tokens_in(offset, text[:-1]) is None             # cut inside a piece
        assert c.tokens_in(offset, " " + text) is None                # not the window's start
        assert c.tokens_in(offset, text + "\n\n" + c.text(offset, 2)) is None
