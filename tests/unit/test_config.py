"""olb.config: every variable parsed, every bad value named."""

import dataclasses
import pathlib

import pytest

from olb import config
from olb.errors import ConfigError


def load(**env):
    return config.load([], env)


def test_defaults_and_backend_syntax():
    cfg = load(OLB_BACKENDS="http://127.0.0.1:11435;max=4;weight=2;gpus=0+1, 127.0.0.1:11436,http://gpu-box")
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 11434)
    a, b, c = cfg.backends
    assert (a.url, a.max_inflight, a.weight, a.gpus) == ("http://127.0.0.1:11435", 4, 2.0, (0, 1))
    assert (b.url, b.max_inflight, b.weight, b.gpus) == ("http://127.0.0.1:11436", 8, 1.0, ())
    assert (c.host, c.port, c.hostport) == ("gpu-box", 11434, "gpu-box:11434")


def test_flags_win_over_environment():
    cfg = config.load(["--listen", "0.0.0.0:9000", "--max-inflight", "3", "--backends", "a:1"],
                      {"OLB_LISTEN": "127.0.0.1:1", "OLB_BACKENDS": "b:2"})
    assert (cfg.listen_host, cfg.listen_port, cfg.max_inflight) == ("0.0.0.0", 9000, 3)
    assert [b.url for b in cfg.backends] == ["http://a:1"]
    assert cfg.backends[0].max_inflight == 3


def test_sizes_and_durations():
    cfg = load(OLB_BACKENDS="a:1", OLB_MAX_BODY="2M", OLB_QUEUE_TIMEOUT="0.5", OLB_WORKERS="4")
    assert (cfg.max_body, cfg.queue_timeout, cfg.workers) == (2 * 1024 * 1024, 0.5, 4)


@pytest.mark.parametrize("raw,value", [
    (None, 512 * 1024),     # on by default (docs/operations.md, "Streams that survive their backend")
    ("0", 0), ("0K", 0),    # off
    ("64K", 64 * 1024), ("2M", 2 * 1024 * 1024), ("1000", 1000),
])
def test_resume_max_bytes(raw, value):
    env = {"OLB_BACKENDS": "a:1"} if raw is None else {"OLB_BACKENDS": "a:1", "OLB_RESUME_MAX_BYTES": raw}
    assert load(**env).resume_max_bytes == value


@pytest.mark.parametrize("env,needle", [
    ({"OLB_BACKENDS": "ftp://a:1"}, "OLB_BACKENDS"),
    ({"OLB_BACKENDS": "https://a:1"}, "https backends are not supported"),
    ({"OLB_BACKENDS": "http://a:99999"}, "OLB_BACKENDS"),
    ({"OLB_BACKENDS": "http://a:1;max=0"}, "max=0"),
    ({"OLB_BACKENDS": "http://a:1;weight=-1"}, "weight"),
    ({"OLB_BACKENDS": "http://a:1;colour=red"}, "one of max=, weight=, gpus="),
    ({"OLB_BACKENDS": "http://a:1,http://a:1"}, "listed twice"),
    ({"OLB_BACKENDS": "a:1", "OLB_LISTEN": "nope"}, "OLB_LISTEN: expected HOST:PORT"),
    ({"OLB_BACKENDS": "a:1", "OLB_CONNECT_TIMEOUT": "-3"}, "OLB_CONNECT_TIMEOUT"),
    ({"OLB_BACKENDS": "a:1", "OLB_MAX_BODY": "lots"}, "OLB_MAX_BODY"),
    ({"OLB_BACKENDS": "a:1", "OLB_WORKERS": "0"}, "OLB_WORKERS: expected an integer >= 1"),
    ({"OLB_BACKENDS": "a:1", "OLB_LOG_LEVEL": "loud"}, "OLB_LOG_LEVEL"),
    ({"OLB_BACKENDS": "a:1", "OLB_POLICY": "random"},
     "OLB_POLICY: expected one of llm, least-inflight, round-robin, got 'random'"),
    ({"OLB_BACKENDS": "a:1", "OLB_POLICY": "round_robin"}, "OLB_POLICY"),
    ({"OLB_BACKENDS": "a:1", "OLB_PULL": "some"}, "OLB_PULL: expected one of all, room, got 'some'"),
    ({"OLB_BACKENDS": "a:1", "OLB_RESUME_MAX_BYTES": "-1"}, "OLB_RESUME_MAX_BYTES: expected 0 (off) or a size"),
    ({"OLB_BACKENDS": "a:1", "OLB_RESUME_MAX_BYTES": "some"}, "OLB_RESUME_MAX_BYTES"),
    # Past what the compiled modules hold in 64-bit integers: refused here, not at the first request.
    ({"OLB_BACKENDS": "a:1", "OLB_MAX_BODY": "99999999999999999999G"}, "OLB_MAX_BODY: expected a size in bytes of at most 2^62"),
    ({"OLB_BACKENDS": "a:1", "OLB_MAX_BODY_HELD": "99999999999999999999G"}, "OLB_MAX_BODY_HELD"),
    ({"OLB_BACKENDS": "a:1", "OLB_RESUME_MAX_BYTES": "99999999999999999999G"}, "OLB_RESUME_MAX_BYTES"),
    ({"OLB_BACKENDS": "http://a:1;max=99999999999999999999999"}, "max=99999999999999999999999"),
    ({"OLB_BACKENDS": "a:1", "OLB_MAX_INFLIGHT": "99999999999999999999999"}, "at most 2^62"),
    ({}, "olb-fast --demo"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(ConfigError) as info:
        load(**env)
    assert needle in str(info.value)


def test_policy_default_values_and_flag():
    assert load(OLB_BACKENDS="a:1").policy == "llm"
    assert load(OLB_BACKENDS="a:1", OLB_POLICY=" Round-Robin ").policy == "round-robin"
    assert config.load(["--backends", "a:1", "--policy", "least-inflight"],
                       {"OLB_POLICY": "round-robin"}).policy == "least-inflight"
    with pytest.raises(ConfigError, match="--policy: expected one of"):
        config.load(["--backends", "a:1", "--policy", "fastest"], {})


def test_flag_errors_name_the_flag():
    with pytest.raises(ConfigError) as info:
        config.load(["--backends", "a:1", "--queue-size", "-1"], {})
    assert "--queue-size" in str(info.value)


def test_demo_needs_no_backends():
    assert config.load(["--demo"], {}).demo == 3
    assert load(OLB_DEMO="2").demo == 2


def test_config_defaults_are_the_settings_defaults():
    """Config() is what a user gets with no variable set: tests that build it
    directly run on the real defaults."""
    defaults = config.Config()
    loaded = load(OLB_BACKENDS="a:1")
    assert dataclasses.replace(loaded, backends=()) == defaults
    fields = {f.name for f in dataclasses.fields(config.Config)}
    settings = {s.field for s in config.SETTINGS}
    assert fields - settings == {"listen_host", "listen_port"}
    assert settings - fields == {"listen"}
    for s in config.SETTINGS:
        if s.field not in ("listen", "backends"):
            assert getattr(defaults, s.field) == s.parse(s.default), s.env


README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_is_the_generated_one():
    table = config.readme_table(README.read_text(encoding="utf-8"))
    assert table == config.settings_markdown(), (
        "README.md's settings table differs from SETTINGS: run `python -m olb.config README.md`")


B, E = config.TABLE_BEGIN, config.TABLE_END


@pytest.mark.parametrize("text,table", [
    (f"intro\n{B}\n\n| a |\n\n{E}\nrest", "| a |"),
    (f"{B}\n| a |\n| b |\n{E}", "| a |\n| b |"),
    (f"{B}{E}", ""),
])
def test_readme_table_is_what_lies_between_the_markers(text, table):
    assert config.readme_table(text) == table
    rewritten = config.with_table(text)
    assert config.readme_table(rewritten) == config.settings_markdown()
    # What lies outside the markers is kept.
    assert rewritten.split(B)[0] == text.split(B)[0] and rewritten.split(E)[1] == text.split(E)[1]


@pytest.mark.parametrize("text", [
    "no markers",
    f"{B} only the first",
    f"only the last {E}",
    f"{E} reversed {B}",
    f"{B} {B} twice {E}",
])
def test_readme_table_needs_one_pair_of_markers(text):
    with pytest.raises(ValueError, match="settings:begin"):
        config.readme_table(text)
    with pytest.raises(ValueError):
        config.with_table(text)


def test_pull_targets():
    assert load(OLB_BACKENDS="a:1").pull == "all"
    assert load(OLB_BACKENDS="a:1", OLB_PULL=" Room ").pull == "room"
    assert config.load(["--backends", "a:1", "--pull", "all"], {"OLB_PULL": "room"}).pull == "all"
