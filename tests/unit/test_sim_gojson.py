"""olb.sim.gojson and olb.sim.clock: Go's JSON and time formats, no sockets."""

import time

import pytest

from olb.sim import gojson
from olb.sim.clock import FIXED_TIME_NS, Clock, format_local, format_utc
from olb.sim.gojson import DecodeError, EmptyBody, decode, go_dumps, parse_go_duration, parse_keep_alive


@pytest.mark.parametrize("body", [b"", b"   ", b" \r\n\t"])
def test_no_value_is_eof(body):
    with pytest.raises(EmptyBody, match="EOF"):
        decode(body, gojson.GENERATE)


@pytest.mark.parametrize("body, message", [
    (b"x", "invalid character 'x' looking for beginning of value"),
    (b'{"model":x}', "invalid character 'x' looking for beginning of value"),
    (b'{"model":}', "invalid character '}' looking for beginning of value"),
    (b"{model:1}", "invalid character 'm' looking for beginning of object key string"),
    (b'{"a" 1}', "invalid character '1' after object key"),
    (b'{"a":1 "b":2}', "invalid character '\"' after object key:value pair"),
    (b'{"a":[1 2]}', "invalid character '2' after array element"),
    (b'{"a":"\\q"}', "invalid character 'q' in string escape code"),
    (b'{"a":"\\u12g4"}', "invalid character 'g' in \\u hexadecimal character escape"),
    (b'{"a":"x\ny"}', "invalid character '\\n' in string literal"),
    (b'{"a":-x}', "invalid character 'x' in numeric literal"),
    (b'{"a":1.x}', "invalid character 'x' after decimal point in numeric literal"),
    (b'{"a":1ex}', "invalid character 'x' in exponent of numeric literal"),
    (b'{"a":tru}', "invalid character '}' in literal true (expecting 'e')"),
    (b'{"a":nul1}', "invalid character '1' in literal null (expecting 'l')"),
    (b"{'a':1}", "invalid character '\\'' looking for beginning of object key string"),
    (b"{", "unexpected EOF"),
    (b'{"model":"llama', "unexpected EOF"),
    (b'{"model":"llama3.2",', "unexpected EOF"),
    (b"[1,", "unexpected EOF"),
])
def test_syntax_errors_read_like_go(body, message):
    with pytest.raises(DecodeError) as info:
        decode(body, gojson.GENERATE)
    assert str(info.value) == message


def test_only_the_first_value_is_read():
    # json.Decoder.Decode stops after one value: trailing bytes never matter.
    assert decode(b'{"model":"a"} trailing {garbage', gojson.GENERATE) == {"model": "a"}
    assert decode(b'{"model":"a"}{"model":"b"}', gojson.GENERATE) == {"model": "a"}


def test_fields_fold_case_and_unknown_keys_drop():
    got = decode(b'{"MODEL":"a","Prompt":"p","nonsense":1,"stream":null}', gojson.GENERATE)
    assert got == {"model": "a", "prompt": "p", "stream": None}


@pytest.mark.parametrize("body, schema, message", [
    (b'{"prompt":1}', gojson.GENERATE,
     "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string"),
    (b'{"stream":"yes"}', gojson.GENERATE,
     "json: cannot unmarshal string into Go struct field GenerateRequest.stream of type bool"),
    (b'{"top_logprobs":1.5}', gojson.GENERATE,
     "json: cannot unmarshal number 1.5 into Go struct field GenerateRequest.top_logprobs of type int"),
    (b'{"messages":{}}', gojson.CHAT,
     "json: cannot unmarshal object into Go struct field ChatRequest.messages of type []api.Message"),
    (b'{"messages":[{"content":3}]}', gojson.CHAT,
     "json: cannot unmarshal number into Go struct field Message.messages.content of type string"),
    (b"[]", gojson.GENERATE, "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
    (b'"x"', gojson.OAI_CHAT,
     "json: cannot unmarshal string into Go value of type openai.ChatCompletionRequest"),
    (b'{"keep_alive":true}', gojson.GENERATE, "Unsupported type: 'bool'"),
    (b'{"keep_alive":"5"}', gojson.GENERATE, 'time: missing unit in duration "5"'),
])
def test_type_errors_read_like_go(body, schema, message):
    with pytest.raises(DecodeError) as info:
        decode(body, schema)
    assert str(info.value) == message


def test_null_top_level_is_an_empty_request():
    assert decode(b"null", gojson.GENERATE) == {}


@pytest.mark.parametrize("text, seconds", [
    ("0", 0.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("300ms", 0.3), ("-1m", -60.0),
    ("2h45m30.5s", 9930.5), ("1µs", 1e-6), (".5h", 1800.0),
])
def test_go_durations(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text, message", [
    ("", 'time: invalid duration ""'),
    ("abc", 'time: invalid duration "abc"'),
    ("-1", 'time: missing unit in duration "-1"'),
    ("5d", 'time: unknown unit "d" in duration "5d"'),
    (".s", 'time: invalid duration ".s"'),
])
def test_go_duration_errors(text, message):
    with pytest.raises(DecodeError) as info:
        parse_go_duration(text)
    assert str(info.value) == message


def test_keep_alive_values():
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive(30) == 30
    assert parse_keep_alive("10m") == 600
    assert parse_keep_alive(-1) == float("inf")
    assert parse_keep_alive("-5m") == float("inf")


def test_go_encoding_escapes_html_and_sorts_maps_on_request():
    assert go_dumps({"t": "<a&b>\u2028"}) == b'{"t":"\\u003ca\\u0026b\\u003e\\u2028"}'
    assert go_dumps({"b": 1, "a": 2}, sort_keys=True) == b'{"a":2,"b":1}'
    assert go_dumps({"b": 1, "a": 2}) == b'{"b":1,"a":2}'


def test_go_time_formats():
    assert format_utc(1691177165_499127000) == "2023-08-04T19:26:05.499127Z"
    assert format_utc(1691177165_000000000) == "2023-08-04T19:26:05Z"
    assert format_utc(1691177165_000000001) == "2023-08-04T19:26:05.000000001Z"
    local = format_local(1691177165_500000000)
    assert local[19:21] == ".5" and (local.endswith("Z") or local[-6] in "+-")


def test_clock_created_at_matches_the_slow_formatter():
    clock = Clock()
    before = time.time_ns()
    text = clock.created_at().decode()
    after = time.time_ns()
    assert format_utc(before)[:19] <= text[:19] <= format_utc(after)[:19]
    assert text.endswith("Z") and not text[:-1].endswith("0")
    frozen = Clock(frozen=True)
    assert frozen.created_at() == format_utc(FIXED_TIME_NS).encode() == b"2024-06-01T12:00:00Z"
    assert frozen.now_ns() == FIXED_TIME_NS
