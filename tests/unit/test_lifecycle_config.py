"""OLB_CONFIG's file format (systemd's EnvironmentFile) and what a reload may change, without sockets."""

import dataclasses

import pytest

from olb import config, lifecycle
from olb.errors import ConfigError


@pytest.mark.parametrize("text,values", [
    ("", {}),
    ("# a comment\n; another\n\n   \n", {}),
    ("OLB_BACKENDS=a:1,b:2\n", {"OLB_BACKENDS": "a:1,b:2"}),
    ("  OLB_MAX_INFLIGHT = 4  \n", {"OLB_MAX_INFLIGHT": "4"}),
    ('OLB_BACKENDS="a:1;max=2, b:2"\n', {"OLB_BACKENDS": "a:1;max=2, b:2"}),
    ("OLB_LOG_LEVEL='debug'\n", {"OLB_LOG_LEVEL": "debug"}),
    ('OLB_CLIENT_HEADER="\n', {"OLB_CLIENT_HEADER": '"'}),  # one quote is no quoting
    ("OLB_BACKENDS=a:1\nOLB_BACKENDS=b:2\n", {"OLB_BACKENDS": "b:2"}),  # the last one wins, as in systemd
    ("OLB_QUEUE_TIMEOUT=\n", {"OLB_QUEUE_TIMEOUT": ""}),
])
def test_env_file_lines(text, values):
    assert config.parse_env_file(text) == values


@pytest.mark.parametrize("text,needle", [
    ("OLB_BACKENDS\n", "olb.env:1: expected VARIABLE=value"),
    ("# ok\nexport OLB_BACKENDS=a:1\n", "olb.env:2: expected VARIABLE=value"),
    ("OLB_BACKEND=a:1\n", "OLB_BACKEND: unknown variable (olb.env:1)"),
    ("PATH=/bin\n", "PATH: unknown variable"),
    ("OLB_CONFIG=/etc/other.env\n", "OLB_CONFIG: cannot be set in the file it names"),
])
def test_env_file_errors_name_the_line_and_variable(text, needle):
    with pytest.raises(ConfigError) as info:
        config.parse_env_file(text, "olb.env")
    assert needle in str(info.value)


def test_the_file_overrides_the_environment_and_a_flag_wins_over_both(tmp_path):
    path = tmp_path / "olb.env"
    path.write_text("OLB_BACKENDS=file:1\nOLB_MAX_INFLIGHT=3\n")
    env = {"OLB_CONFIG": str(path), "OLB_BACKENDS": "env:1", "OLB_QUEUE_SIZE": "7"}
    cfg = config.load([], env)
    assert [b.url for b in cfg.backends] == ["http://file:1"]
    assert (cfg.max_inflight, cfg.queue_size, cfg.config) == (3, 7, str(path))
    cfg = config.load(["--max-inflight", "5"], env)
    assert cfg.max_inflight == 5
    cfg = config.load(["--config", str(path)], {"OLB_BACKENDS": "env:1"})
    assert [b.url for b in cfg.backends] == ["http://file:1"]


def test_a_bad_value_in_the_file_names_its_variable(tmp_path):
    path = tmp_path / "olb.env"
    path.write_text("OLB_BACKENDS=a:1\nOLB_SHUTDOWN_TIMEOUT=never\n")
    with pytest.raises(ConfigError, match="OLB_SHUTDOWN_TIMEOUT: expected a number of seconds > 0"):
        config.load([], {"OLB_CONFIG": str(path)})
    with pytest.raises(ConfigError, match="OLB_CONFIG: cannot read .*missing.env"):
        config.load([], {"OLB_CONFIG": str(tmp_path / "missing.env")})


BASE = config.Config(backends=config.parse_backends("a:1", 8))


@pytest.mark.parametrize("change,refused", [
    ({"backends": config.parse_backends("b:1;max=2", 8)}, None),
    ({"max_inflight": 2, "queue_timeout": 3.0, "shutdown_timeout": 1.0}, None),
    ({"policy": "round-robin"}, None),
    ({"listen_port": 9000}, "OLB_LISTEN"),
    ({"listen_host": "0.0.0.0"}, "OLB_LISTEN"),
    ({"workers": 2}, "OLB_WORKERS"),
    ({"demo": 3}, "OLB_DEMO"),
])
def test_what_a_reload_may_change(change, refused):
    new = dataclasses.replace(BASE, **change)
    if refused is None:
        assert lifecycle.check_reload(BASE, new) == []
    else:
        with pytest.raises(ConfigError, match=f"{refused}: cannot change on reload"):
            lifecycle.check_reload(BASE, new)


def test_reload_hooks_refuse_or_commit(monkeypatch):
    applied = []

    def keys(cfg):
        if cfg.max_inflight == 1:
            raise ConfigError("OLB_API_KEYS: line 3: bad limit")
        return lambda: applied.append(cfg.max_inflight)

    monkeypatch.setattr(lifecycle, "RELOAD_HOOKS", [keys])
    with pytest.raises(ConfigError, match="OLB_API_KEYS"):
        lifecycle.check_reload(BASE, dataclasses.replace(BASE, max_inflight=1))
    commits = lifecycle.check_reload(BASE, dataclasses.replace(BASE, max_inflight=4))
    assert applied == []  # nothing applied before every hook accepted
    for commit in commits:
        commit()
    assert applied == [4]


def test_the_example_env_file_loads():
    """packaging/olb.env, as the unit names it, is a valid configuration."""
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "packaging" / "olb.env"
    cfg = config.load([], {"OLB_CONFIG": str(path)})
    assert [b.url for b in cfg.backends] == ["http://127.0.0.1:11435", "http://127.0.0.1:11436"]
    assert {b.max_inflight for b in cfg.backends} == {4}
    unit = (path.parent / "olb.service").read_text()
    assert "Environment=OLB_CONFIG=/etc/olb/olb.env" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
