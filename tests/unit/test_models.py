"""olb.models without sockets: names, request bodies, masks."""

import collections
import json
import random
from types import SimpleNamespace

import orjson
import pytest

from olb import models
from olb.models import (ModelDirectory, display_shortest, namespace, normalize, openai_model_id, parse_request,
                        streams, takes_slot)


@pytest.mark.parametrize("name,expected", [
    ("llama3", "llama3:latest"),
    ("Llama3.2:3B", "llama3.2:3b"),
    ("library/llama3.2", "llama3.2:latest"),
    ("registry.ollama.ai/library/x:7b", "x:7b"),
    ("myns/m", "myns/m:latest"),
    ("host:5000/ns/m", "host:5000/ns/m:latest"),
    ("hf.co/user/model:Q4_K_M", "hf.co/user/model:q4_k_m"),
    ("x@sha256:" + "a" * 64, "x:latest"),
])
def test_normalize_like_ollama(name, expected):
    assert normalize(name) == expected


@pytest.mark.parametrize("body,expected", [
    (b'{"model":"llama3.2","prompt":"x"}', "llama3.2"),
    (b'{"name":"llama3.2"}', "llama3.2"),
    (b'{"model":""}', None),
    (b'{"model":7}', None),
    (b"[1,2]", None),
    (b"{not json", None),
    (b"", None),
    (b'{"Model":"llama3.2"}', "llama3.2"),                 # Go matches a field's name ignoring case
    (b'{"model":"a","MODEL":"b"}', "b"),                    # ... and the last of repeated keys wins
    (b'{"model":"","name":"b"}', "b"),
    (b'{"model":" \\t","name":"b"}', None),               # blank (strip()'s whitespace, escapes too)
    (b'{"model":"\xc2\xa0\xe3\x80\x80"}', None),
    (b'{"model":null,"name":"b"}', "b"),
    (b'{"model":"m\\u00e9"}', "m\u00e9"),                 # an escape: decoded by orjson
    (b'{"model":"m\xc3\xa9"}', "m\u00e9"),                 # UTF-8 decoded in place
    (b'{"model":"m\xff"}', None),                           # not UTF-8
    (b'{"model":"m\x01"}', None),                           # a control character in a string
    (b'{"model":"m"} x', None),                             # bytes after the object
    (b'{"model":"m",}', None),
    (b'{"model":"m" "prompt":"x"}', None),
    (b'{"prompt":,"model":"m"}', None),
    (b'{"model":"m","prompt":"x\\"}', None),               # the string never ends
    (b' \r\n{ "model" : "m" }\n', "m"),
])
def test_request_model(body, expected):
    assert parse_request(body)[0] == expected
    assert parse_request(bytearray(body))[0] == expected  # (h11's chunked bodies)


def test_request_model_after_another():
    """The reader keeps the last name it decoded (olb/_body.pyx): a name of the
    same length, a prefix, an escaped spelling of it are each read anew."""
    bodies = [b'{"model":"llama3"}', b'{"model":"llama4"}', b'{"model":"llama"}', b'{"model":"llama3"}',
              b'{"model":"llama\\u0033"}', b'{"name":"llama3:8b"}', b'{"model":"llama3"}']
    assert [parse_request(b)[0] for b in bodies] == ["llama3", "llama4", "llama", "llama3", "llama3", "llama3:8b",
                                                     "llama3"]


def _go_routed(pairs):
    """What Ollama's decoder (Go's encoding/json) makes of the members, in
    parse_request's terms: keys matched ignoring ASCII case, the last wins."""
    doc = {}
    for key, value in pairs:
        doc[key.lower()] = value
    model = doc.get("model") or doc.get("name")
    if not isinstance(model, str) or not model.strip():
        return (None, None, ())
    messages = doc.get("messages")
    conversation = models._conversation(messages) if isinstance(messages, list) else None
    return (model, conversation, models.runner_key(doc.get("options")))


def _random_value(rng, depth=0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(["x", "", 'a "quoted" }] word', "back\\slash\\", "caf\u00e9 \u2603", "\n\t", "}{[]"])
    if kind == 1:
        return rng.choice([0, -1, 12.5, 1e300, 2 ** 40])
    if kind in (2, 3):
        return rng.choice([True, False, None])
    if kind == 4:
        return rng.choice(["llama3.2", "qwen2.5:7b", "m"])
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6:
        return {rng.choice(["role", "content", "num_ctx", "a"]): _random_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [{"role": rng.choice(["user", "assistant", "system", "tool"]), "content": _random_value(rng, 3)}
            for _ in range(rng.randrange(1, 4))]


def _encode(rng, pairs):
    """The members as a JSON object, with random whitespace and escapes."""
    def ws():
        return rng.choice(["", "", " ", "\n  ", "\t"])

    def key(k):
        if rng.random() < 0.2:  # a \u escape for one letter
            i = rng.randrange(len(k))
            return '"' + k[:i] + "\\u%04x" % ord(k[i]) + k[i + 1:] + '"'
        return orjson.dumps(k).decode()

    def value(v):
        text = orjson.dumps(v).decode()
        return text if rng.random() < 0.5 else json.dumps(v, indent=rng.choice([None, 1]))

    inner = ("," + ws()).join(f"{ws()}{key(k)}{ws()}:{ws()}{value(v)}{ws()}" for k, v in pairs)
    return (ws() + "{" + inner + "}" + ws()).encode()


def test_routing_members_against_gos_decoding_of_random_bodies():
    """parse_request steps through the body (olb/_body.pyx) without
    decoding it: on seeded random objects (routing's keys in any case and
    order, repeated, escaped; values with quotes, brackets and escapes
    inside strings) it reads what a whole decoding reads."""
    rng = random.Random(20261202)
    names = ["model", "Model", "MODEL", "name", "options", "Options", "messages", "prompt", "images", "stream"]
    for _ in range(3000):
        pairs = []
        for _ in range(rng.randrange(6)):
            k = rng.choice(names)
            if k.lower() == "options":
                v = rng.choice([{"num_ctx": rng.choice([2048, 4096.0, -1])}, {"temperature": 0.5}, {},
                                {"num_gpu": -1, "use_mmap": False}, "x", None])
            elif k.lower() == "messages":
                v = _random_value(rng) if rng.random() < 0.3 else [
                    {"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": rng.choice(["a", 'a"}]'])}][:rng.randrange(1, 4)]
            else:
                v = _random_value(rng)
            pairs.append((k, v))
        body = _encode(rng, pairs)
        assert parse_request(body) == _go_routed(pairs), body


def directory(n=3):
    backends = [SimpleNamespace(index=i, spec=None) for i in range(n)]
    return ModelDirectory(backends, interval=10, timeout=1)


def test_unknown_backends_may_have_any_model():
    d = directory()
    assert d.installed_mask("llama3.2:latest") == bytearray(b"\x01\x01\x01")
    d.set_catalogue(0, [{"name": "llama3.2:latest"}], [])
    d.set_catalogue(1, [{"name": "qwen2.5:7b"}], [{"name": "qwen2.5:7b"}])
    assert d.installed_mask("llama3.2:latest") == bytearray(b"\x01\x00\x01")  # 2 still unknown
    d.set_catalogue(2, [], [])
    assert not any(d.installed_mask("missing:latest"))
    assert d.loaded_mask("qwen2.5:7b") == bytearray(b"\x00\x01\x00")


def test_masks_are_live_objects():
    d = directory()
    loaded = d.loaded_mask("m:latest")
    d.mark_loaded("m:latest", 2)
    assert loaded == bytearray(b"\x00\x00\x01")  # the same object, updated in place
    d.set_catalogue(2, [{"name": "m:latest"}], [])  # no longer loaded there
    assert loaded == bytearray(3)


def test_spare_excludes_backends_where_another_resident_model_is_serving():
    d = directory(4)

    def admitted(model, index, delta):
        # In-flight counts alone here (demand has its own test): it is forgotten at once.
        d.admitted(model, index, delta)
        d.demand.clear()

    d.mark_loaded("a:latest", 0)
    d.mark_loaded("b:latest", 1)
    d.mark_loaded("b:latest", 2)
    d.mark_loaded("c:latest", 2)
    everywhere = bytearray(b"\x01" * 4)
    assert d.spare("a:latest", everywhere) == everywhere      # nothing in flight: all spare
    admitted("b:latest", 2, 1)
    assert d.spare("a:latest", everywhere) == bytearray([1, 1, 0, 1])  # b serves on 2 only
    admitted("a:latest", 0, 1)                              # the model's own requests do not count
    assert d.spare("a:latest", everywhere) == bytearray([1, 1, 0, 1])
    assert d.spare("b:latest", everywhere) == bytearray([0, 1, 1, 1])
    admitted("b:latest", 2, -1)
    assert d.spare("a:latest", bytearray([0, 0, 1, 1])) == bytearray([0, 0, 1, 1])  # within the mask
    # Requests waiting for c (resident on 2) make it in use there too; waiting for a model
    # resident nowhere, or for `model` itself, changes nothing.
    waiting = collections.Counter({"c:latest": 1, "z:latest": 3, "a:latest": 9})
    assert d.spare("a:latest", everywhere, waiting) == bytearray([1, 1, 0, 1])


def test_spare_keeps_idle_models_with_recent_demand():
    d = directory(3)
    d.mark_loaded("a:latest", 0)
    d.mark_loaded("b:latest", 1)
    d.mark_loaded("c:latest", 2)
    every = bytearray(b"\x01" * 3)
    for model, n in (("a:latest", 10), ("b:latest", 5), ("c:latest", 4)):
        for _ in range(n):
            d.admitted(model, 0, 1)
            d.admitted(model, 0, -1)   # done: nothing in flight anywhere
    assert d.demand["a:latest"] == 10
    # For a (10): b (5) is at half its demand, kept; c (4) is below, spare.
    assert d.spare("a:latest", every) == bytearray([1, 0, 1])
    # For a model with no demand of its own, any model with some is kept.
    assert d.spare("z:latest", every) == bytearray([0, 0, 0])


def test_demand_counts_the_last_window_of_requests(monkeypatch):
    from olb import models as models_mod

    monkeypatch.setattr(models_mod, "DEMAND_WINDOW", 4)
    d = directory(1)
    for m in ("a", "a", "b", "b", "b", "b"):
        d.admitted(m, 0, 1)
    assert d.demand["a"] == 0 and d.demand["b"] == 4 and len(d._recent) == 4


def test_answered_asks_for_one_refresh_per_load_olb_placed():
    d = directory(2)
    asked = []
    d.on_load = asked.append
    d.set_catalogue(0, [{"name": "a"}, {"name": "b"}], [{"name": "a"}])
    d.answered("a:latest", 0)                  # warm all along: nothing new
    assert asked == []
    d.mark_placed("b:latest", 0)               # olb sends b there: a may be unloaded for it
    assert d.loaded_mask("b:latest")[0]
    d.answered("b:latest", 0)
    assert asked == [0]
    d.set_catalogue(0, [{"name": "a"}, {"name": "b"}], [{"name": "b"}])  # the read: b in, a out
    d.answered("b:latest", 0)                  # the next answers: no further reads
    assert asked == [0]
    d.answered("b:latest", 1)                  # answered where olb did not place it
    assert asked == [0]


def test_forget_makes_a_backend_unknown_again():
    d = directory(2)
    d.set_catalogue(0, [{"name": "a:latest"}], [{"name": "a:latest"}])
    d.set_catalogue(1, [], [])
    d.forget(0)
    assert d.installed_mask("b:latest") == bytearray(b"\x01\x00")
    assert d.loaded_mask("a:latest") == bytearray(2)


def test_merged_tags_deduplicates_and_keeps_newest():
    d = directory(2)
    d.set_catalogue(0, [{"name": "a:latest", "modified_at": "2024-01-01T00:00:00Z", "size": 1}], [])
    d.set_catalogue(1, [{"name": "a:latest", "modified_at": "2025-01-01T00:00:00.123456789Z", "size": 2},
                        {"name": "b:latest", "modified_at": "2023-01-01T00:00:00-07:00"}], [])
    tags = d.merged_tags()["models"]
    assert [(m["name"], m.get("size")) for m in tags] == [("a:latest", 2), ("b:latest", None)]
    v1 = d.merged_openai_models()["data"]
    assert v1[0]["id"] == "a:latest" and v1[0]["created"] == 1735689600
    assert v1[1]["created"] == 1672556400


def test_conversation_identity_survives_later_turns():
    system = {"role": "system", "content": "You are terse."}
    turn1 = [system, {"role": "user", "content": "Plan a trip to Kyoto"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And Osaka?"}]
    turn3 = turn2 + [{"role": "assistant", "content": "Also."}, {"role": "user", "content": "Nara?"}]
    other = [system, {"role": "user", "content": "Fix my bash script"},
             {"role": "assistant", "content": "Show me."}, {"role": "user", "content": "here"}]
    ids = [parse_request(orjson.dumps({"model": "m", "messages": m}))[1] for m in (turn1, turn2, turn3, other)]
    # A first turn has no cache to return to: no conversation bytes.
    assert ids[0] is None
    assert ids[1] == ids[2] != ids[3]
    assert ids[1] == orjson.dumps(turn1)
    model, prompt_id, _ = parse_request(b'{"model":"m","prompt":"Once upon a time","system":"s"}')
    assert model == "m" and prompt_id is None  # generate: the session header only


GB = 10**9


def ps(*models):
    """/api/ps entries: (name, size, size_vram) triples."""
    return [{"name": n, "model": n, "size": size, "size_vram": vram} for n, size, vram in models]


def big_and_small():
    """Backend 0 (a big GPU) has held three 5 GB models at once and now holds two;
    backend 1 (a small one) has held one and holds one. Both have everything installed."""
    d = directory(2)
    tags = [{"name": m} for m in ("a", "b", "c", "d")]
    d.set_catalogue(0, tags, ps(("a", 5 * GB, 5 * GB), ("b", 5 * GB, 5 * GB), ("c", 5 * GB, 5 * GB)))
    d.set_catalogue(0, tags, ps(("a", 5 * GB, 5 * GB), ("b", 5 * GB, 5 * GB)))
    d.set_catalogue(1, tags, ps(("d", 6 * GB, 6 * GB)))
    return d


def test_fits_where_a_backend_has_held_as_much_before():
    d = big_and_small()
    both = bytearray([1, 1])
    assert d.room_models == [3, 1] and d.room_vram == [15 * GB, 6 * GB]
    assert d.fits("c:latest", both) == bytearray([1, 0])   # third model on 0; 1 is full
    assert d.fits("d:latest", both) == bytearray([0, 0])   # 6 GB: more than 0 has shown room for; loaded on 1
    assert d.fits("new:latest", both) == bytearray([0, 0])  # never seen loaded: footprint unknown
    assert d.fits("c:latest", bytearray([0, 1])) == bytearray([0, 0])  # within the mask


def test_fits_counts_placements_not_yet_in_ps():
    d = big_and_small()
    d.footprint["x:latest"] = 1 * GB                   # x was seen loaded once, somewhere
    both = bytearray([1, 1])
    assert d.fits("x:latest", both) == bytearray([1, 0])
    d.mark_placed("c:latest", 0)                        # olb sent c to 0: its third slot is taken
    assert d.fits("x:latest", both) == bytearray([0, 0])
    d2 = big_and_small()
    d2.footprint["x:latest"] = 1 * GB
    d2.mark_placed("unknown:latest", 0)                 # unknown footprint: assume no room left
    assert d2.fits("x:latest", both) == bytearray([0, 0])


@pytest.mark.parametrize("bad", [None, -5, "12", 1.5, True])
def test_room_ignores_sizes_that_are_not_byte_counts(bad):
    d = directory(1)
    d.set_catalogue(0, [{"name": "a"}], [{"name": "a", "size": bad, "size_vram": bad}])
    assert d.room_models == [1] and d.room_vram == [0]
    assert "a:latest" not in d.footprint


def test_fits_by_free_vram_where_the_gpus_are_read():
    d = directory(2)
    tags = [{"name": m} for m in ("a", "b", "c")]
    # 0 has held two models (never three); 1 held one. Both GPUs read: 0 has
    # 60 GB free on one GPU, 1 has 4 GB.
    d.set_catalogue(0, tags, ps(("a", 5 * GB, 5 * GB), ("b", 5 * GB, 5 * GB)))
    d.set_catalogue(1, tags, ps(("c", 6 * GB, 6 * GB)))
    both = bytearray([1, 1])
    d.footprint["x:latest"] = 9 * GB
    assert d.fits("x:latest", both) == bytearray([0, 0])       # by what /api/ps showed: no room
    d.set_gpu_memory(0, 60 * GB, 1)
    d.set_gpu_memory(1, 4 * GB, 1)
    assert d.fits("x:latest", both) == bytearray([1, 0])       # 9 <= 0.8 x 60; a third model of 3
    d.footprint["huge:latest"] = 50 * GB
    assert d.fits("huge:latest", both) == bytearray([0, 0])    # 50 > 0.8 x 60
    d.mark_placed("c:latest", 0)                               # a third model on its way to 0
    assert d.fits("x:latest", both) == bytearray([0, 0])       # 3 per GPU reached
    d.set_gpu_memory(0, None)                                  # reading gone: back to /api/ps
    assert d.gpu_count[0] == 0 and d.vram_free[0] is None


def test_an_answer_for_a_model_the_last_ps_did_not_list_rereads_the_catalogue():
    d = directory(3)
    asked = []
    d.on_load = asked.append
    d.set_catalogue(0, [{"name": "a"}, {"name": "b"}], [{"name": "a"}])
    d.answered("a:latest", 0)          # listed by /api/ps: warm, nothing to read
    assert asked == []
    d.mark_loaded("b:latest", 0)       # traffic said b is warm on 0; /api/ps did not
    d.answered("b:latest", 0)          # Ollama may have reloaded it (and evicted a)
    assert asked == [0]
    d.answered("c:latest", 1)          # /api/ps of 1 never read (not polled, not an Ollama)
    assert asked == [0]
    d.set_catalogue(0, [{"name": "a"}, {"name": "b"}], [{"name": "b"}])
    d.answered("b:latest", 0)          # now listed
    assert asked == [0]
    d.forget(0)
    d.answered("b:latest", 0)          # down and back: unknown until read again
    assert asked == [0]


def test_least_harm_evicts_a_spare_copy_before_an_only_copy():
    d = directory(4)
    for i in (0, 1, 2):
        d.mark_loaded("hot:latest", i)        # three copies of a busy model
    d.mark_loaded("quiet:latest", 3)          # the only copy of a quieter one
    for model, n in (("hot:latest", 9), ("quiet:latest", 4)):
        for _ in range(n):
            d.admitted(model, 0, 1)
    d.mark_loaded("other:latest", 0)          # 0 also holds a model without demand
    every = bytearray(b"\x01" * 4)
    # hot costs 9/3 = 3 per backend, quiet 4 on 3: backends 1 and 2 tie (one model each).
    assert d.least_harm(every) == bytearray([0, 1, 1, 0])
    assert d.least_harm(bytearray([1, 0, 0, 1])) == bytearray([1, 0, 0, 0])  # 3 + 0 < 4
    assert d.least_harm(bytearray([0, 0, 0, 1])) is None                     # all of the mask
    d2 = directory(2)
    d2.mark_loaded("a:latest", 0)
    assert d2.least_harm(bytearray([1, 1])) == bytearray([0, 1])  # no demand: fewest models


# --- big bodies: the fields routing reads, without decoding the images --------------------------------

IMAGE = "iVBORw0KGgo/" + "A" * (3 * 1024 * 1024) + "=="  # 3 MB of base64, '/' included


@pytest.mark.parametrize("doc", [
    {"model": "llava", "prompt": "what is this", "images": [IMAGE], "options": {"num_ctx": 8192}},
    {"images": [IMAGE, IMAGE], "options": {"num_ctx": 8192}, "model": "llava"},   # model after the images
    {"options": {"num_ctx": 8192.0, "num_gpu": -1, "temperature": 0}, "images": [IMAGE], "model": "llava"},
    {"prompt": "x\\\"y\"" * 10, "images": [IMAGE], "model": "llava", "options": {"num_ctx": 8192}},
    {"model ": 1, "images": [IMAGE], "modelx": "no", "options": {"num_ctx": 8192}, "model": "llava"},
    {"stream": False, "keep_alive": -1, "format": {"type": "object", "properties": {"a": [1, {"b": "}"}]}},
     "images": [IMAGE], "name": "llava", "options": {"num_ctx": 8192}},
])
def test_big_body_fields_in_any_order(doc):
    body = orjson.dumps(doc)
    assert len(body) > 3_000_000
    assert parse_request(body) == ("llava", None, (("num_ctx", 8192),))


def test_big_body_duplicate_keys_the_last_wins_as_in_orjson():
    body = b'{"model":"wrong","images":["' + IMAGE.encode() + b'"],"options":{"num_ctx":8192},"model":"llava"}'
    assert orjson.loads(body)["model"] == "llava"
    assert parse_request(body) == ("llava", None, (("num_ctx", 8192),))


def test_big_body_with_whitespace_and_escaped_keys():
    body = (b'{ "images" : [ "' + IMAGE.encode() + b'" ] ,\n "\\u006dodel" :\t"llava" , "options" : { } }')
    assert parse_request(body) == ("llava", None, ())


def test_big_chat_body_has_the_small_bodys_conversation_bytes():
    system = {"role": "system", "content": "be brief"}
    user = {"role": "user", "content": "look", "images": ["small"]}
    follow = [{"role": "assistant", "content": "a cat"}, {"role": "user", "content": "sure?"}]
    small = parse_request(orjson.dumps({"model": "llava", "messages": [system, user] + follow}))
    # The same conversation with an image in a later turn: over SMALL_BODY,
    # scanned, and the same bytes (the lead is small, decoded the same way).
    big_later = [system, user] + follow + [{"role": "user", "content": "and this", "images": [IMAGE]}]
    big = parse_request(orjson.dumps({"messages": big_later, "model": "llava"}))
    assert big == small and small[1] == orjson.dumps([system, user])
    # A first turn with an image: no follow-up, no conversation bytes.
    first = parse_request(orjson.dumps({"model": "llava", "messages": [system, dict(user, images=[IMAGE])]}))
    assert first == ("llava", None, ())
    # An image in the lead itself: its first bytes stand for it, turn after turn.
    lead = [system, dict(user, images=[IMAGE])]
    turn2 = parse_request(orjson.dumps({"model": "llava", "messages": lead + follow}))
    turn3 = parse_request(orjson.dumps({"model": "llava", "messages": lead + follow + follow}))
    assert turn2[1] == turn3[1] and turn2[1].startswith(orjson.dumps([system])[:-1])
    assert len(turn2[1]) == 2048


@pytest.mark.parametrize("body", [
    b'{"images":["' + b"A" * 100_000 + b'"],"model":"llava"',          # cut short
    b'{"images":["' + b"A" * 100_000,                                   # unterminated string
    b'["' + b"A" * 100_000 + b'"]',                                     # not an object
    b'{"images":["' + b"A" * 100_000 + b'"] "model":"llava"}',          # no comma
    b'{"images":["' + b"A" * 100_000 + b'"],"model":7}',                # not a string
])
def test_big_bad_bodies_route_by_nothing(body):
    assert parse_request(body) == (None, None, ())


def test_big_body_of_many_small_values_is_parsed_whole():
    """Past SCAN_BUDGET messages the message-by-message walk stops and orjson
    decodes the array: the same answer, in bounded Python steps."""
    from olb import models
    doc = {"messages": [{"role": "user", "content": "x"}] * 30_000 + [{"role": "assistant", "content": "y"}],
           "model": "m", "options": {"num_batch": 64}}
    body = orjson.dumps(doc)
    assert len(body) > models.SMALL_BODY
    got = parse_request(body)
    assert got[0] == "m" and got[2] == (("num_batch", 64),)
    assert got[1] == orjson.dumps(doc["messages"][:1])


@pytest.mark.parametrize("options, key", [
    (None, ()),
    ({}, ()),
    ({"temperature": 0.2, "num_predict": 5}, ()),                 # not runner options
    ({"num_thread": 8, "num_ctx": 4096}, (("num_ctx", 4096), ("num_thread", 8))),
    ({"num_gpu": -1}, ()),                                          # needsReload ignores -1
    ({"num_gpu": 0, "use_mmap": False, "main_gpu": 1, "num_batch": 512.0},
     (("num_batch", 512), ("num_gpu", 0), ("main_gpu", 1), ("use_mmap", False))),
    ({"num_ctx": [1]}, ()),
])
def test_runner_key(options, key):
    from olb.models import runner_key
    assert runner_key(options) == key
    assert parse_request(orjson.dumps({"model": "m", "options": options}))[2] == key


def test_a_20_mb_body_is_not_decoded_whole(monkeypatch):
    """The model after a 20 MB image: only the small values are decoded."""
    from olb import models
    decoded = []
    loads = orjson.loads

    def counting(data):
        decoded.append(len(data))
        return loads(data)

    monkeypatch.setattr(models, "_loads", counting)
    body = orjson.dumps({"prompt": "what is in this picture?", "images": ["QUFB" * (5 * 1024 * 1024)],
                         "options": {"num_ctx": 16384}, "model": "llava:13b"})
    assert len(body) > 20 * 1024 * 1024
    assert parse_request(body) == ("llava:13b", None, (("num_ctx", 16384),))
    assert decoded and max(decoded) < 100


@pytest.mark.parametrize("tags_size, seen, expected", [
    # a: 4 GB on disk took 5 GB loaded (ratio 1.25); new: 8 GB on disk -> 10 GB.
    (8 * GB, True, 10 * GB),
    (None, True, None),            # no disk size: nothing to scale
    (8 * GB, False, None),         # no model seen loaded: no ratio
])
def test_need_of_a_model_never_seen_loaded(tags_size, seen, expected):
    d = directory(2)
    tags = [{"name": "a", "size": 4 * GB}, {"name": "new", "size": tags_size}]
    d.set_catalogue(0, tags, ps(("a", 5 * GB, 5 * GB)) if seen else [])
    assert d.need("new:latest") == expected
    assert d.need("a:latest") == (5 * GB if seen else None)  # its own footprint, once seen
    # and the room rule uses it: 1 has 14 GB free on one GPU, 0.8 x 14 >= 10.
    d.set_catalogue(1, tags, [])
    d.set_gpu_memory(1, 14 * GB, 1)
    assert d.fits("new:latest", bytearray([0, 1])) == bytearray([0, 1 if expected else 0])

@pytest.mark.parametrize("method,path,slot", [
    (b"POST", b"/api/generate", True), (b"POST", b"/api/chat", True), (b"POST", b"/api/embed", True),
    (b"POST", b"/api/embeddings", True), (b"POST", b"/v1/chat/completions", True),
    (b"POST", b"/v1/completions", True), (b"POST", b"/v1/embeddings", True), (b"POST", b"/v1/messages", True),
    (b"POST", b"/v1/responses", True), (b"POST", b"/v1/audio/transcriptions", True),
    (b"GET", b"/api/generate", False),  # Ollama's 405 at once
    (b"HEAD", b"/", False), (b"GET", b"/", False), (b"GET", b"/api/version", False),
    (b"GET", b"/api/tags", False), (b"GET", b"/api/ps", False), (b"POST", b"/api/show", False),
    (b"POST", b"/api/pull", False), (b"POST", b"/api/push", False), (b"POST", b"/api/create", False),
    (b"POST", b"/api/copy", False), (b"DELETE", b"/api/delete", False),
    (b"HEAD", b"/api/blobs/sha256:" + b"a" * 64, False), (b"POST", b"/api/blobs/sha256:" + b"a" * 64, False),
    (b"GET", b"/v1/models", False), (b"GET", b"/v1/models/llama3.2", False), (b"OPTIONS", b"/api/chat", False),
])
def test_only_requests_that_run_a_model_take_a_slot(method, path, slot):
    assert takes_slot(method, path) is slot


@pytest.mark.parametrize("path,body,expected", [
    (b"/api/generate", b'{"model":"m"}', True),             # Stream *bool: nil streams
    (b"/api/generate", b'{"model":"m","stream":null}', True),
    (b"/api/generate", b'{"model":"m","stream":false}', False),
    (b"/api/chat", b'{"model":"m","stream":true}', True),
    (b"/api/pull", b'{"model":"m"}', True),
    (b"/api/embed", b'{"model":"m","stream":true}', False),  # never streams
    (b"/v1/chat/completions", b'{"model":"m"}', False),      # OpenAI: false unless asked
    (b"/v1/chat/completions", b'{"model":"m","stream":true}', True),
    (b"/v1/messages", b'{"model":"m","stream":true}', True),
    (b"/v1/responses", b'{"model":"m"}', False),
    (b"/api/generate", b'{not json', True),                # the backend's 400 comes at once anyway
    (b"/api/show", b'{"model":"m"}', False),
])
def test_streams(path, body, expected):
    assert streams(b"POST", path, body) is expected


@pytest.mark.parametrize("path,expected", [
    (b"/v1/models/llama3.2", "llama3.2"), (b"/v1/models/llama3.2%3Alatest", "llama3.2:latest"),
    (b"/v1/models/", None), (b"/v1/models", None), (b"/v1/models/a/b", None), (b"/v1/models/a%2Fb", None),
    (b"/v1/modelsx", None),
])
def test_openai_model_id_is_one_decoded_segment(path, expected):
    assert openai_model_id(path) == expected


@pytest.mark.parametrize("name,shortest,ns", [
    ("Llama3.2", "Llama3.2:latest", "library"), ("library/x:7B", "x:7B", "library"),
    ("me/m", "me/m:latest", "me"), ("hf.co/user/m:Q4", "hf.co/user/m:Q4", "user"),
])
def test_display_shortest_keeps_case_and_namespace(name, shortest, ns):
    assert display_shortest(name) == shortest and normalize(name) == shortest.lower()
    assert namespace(name) == ns


def test_openai_model_comes_from_the_newest_entry_of_any_backend():
    d = directory(2)
    d.set_catalogue(0, [{"name": "a:latest", "modified_at": "2024-01-01T00:00:00Z"}], [])
    d.set_catalogue(1, [{"name": "a:latest", "modified_at": "2025-01-01T00:00:00Z"}], [])
    assert d.openai_model("A") == {"id": "A", "object": "model", "created": 1735689600, "owned_by": "library"}
    assert d.openai_model("b") is None


def test_recheck_shares_one_round_and_waits_out_its_interval(monkeypatch):
    """Misses that arrive while a re-read runs join it; one that arrives
    within RECHECK_INTERVAL of it is answered from it; after that, a new one."""
    import asyncio

    import olb.models as models_mod

    reads = []

    class Counted(ModelDirectory):
        async def refresh(self, index):
            reads.append(index)
            await asyncio.sleep(0)
            return True

    d = Counted([SimpleNamespace(index=i, spec=None) for i in range(2)], interval=10, timeout=1)
    clock = [100.0]
    monkeypatch.setattr(models_mod.time, "monotonic", lambda: clock[0])

    async def main():
        await asyncio.gather(*(d.recheck([0, 1]) for _ in range(3)))
        assert reads == [0, 1]
        clock[0] += models_mod.RECHECK_INTERVAL / 2
        await d.recheck([0, 1])
        assert reads == [0, 1]
        clock[0] += models_mod.RECHECK_INTERVAL
        await d.recheck([0, 1])
        assert reads == [0, 1, 0, 1]

    asyncio.run(main())
