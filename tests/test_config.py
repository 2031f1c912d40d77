"""Tier 1: the configuration keys as one table (config.KEYS), read by the command
line, the TOML loader and the reload alike."""

from dataclasses import fields

import pytest

from cmad.daemon.config import (KEYS, LAYOUT, LIVE, RESTART, Config, ConfigError, flag_values,
                                keys_reloaded, load)
from cmad.daemon.main import parse_args


def test_every_config_field_is_one_row_with_its_flag():
    assert list(KEYS) == [f.name for f in fields(Config)]
    args = parse_args(["--arena-size", "4M", "--gather-limit", "1G", "--map", "*=video"])
    config = load(None, flag_values(args))
    assert (config.arena_size, config.gather_limit, config.map) == (4 << 20, "1G", "*=video")
    assert KEYS["limits"].flag is None and "limits" not in flag_values(args)
    with pytest.raises(SystemExit):
        parse_args(["--limits", "1000=1M"])             # the TOML file only


def test_the_reload_rules_come_from_the_table():
    assert keys_reloaded(LIVE) == ["map", "limits", "log_level"]
    assert keys_reloaded(LAYOUT) == ["regions", "arena_size", "base"]
    assert set(keys_reloaded(RESTART)) == set(KEYS) - set(keys_reloaded(LIVE)) - set(
        keys_reloaded(LAYOUT))


def test_a_flag_is_checked_by_its_row(tmp_path):
    with pytest.raises(ConfigError, match="backing: 'disk' is not one of"):
        load(None, flag_values(parse_args(["--backing", "disk"])))
    toml = tmp_path / "cmad.toml"
    toml.write_text("[limits]\n1000 = \"1M\"\n")
    assert load(str(toml), {}).limits == {1000: 1 << 20}
