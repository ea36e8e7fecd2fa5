"""``Config.token_sets()`` is computed once per loaded config; the loader pauses the GC."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest

from anybilld.config import load_config
from anybilld.errors import ConfigError

CONFIG = """\
version: 1
identity: {client_id: c}
output_dir: out
state_dir: state
merchants:
  - {id: a, username: ua, password: pa, scopes: [bill, store]}
  - {id: b, username: ub, password: pb, scopes: [user]}
"""


def test_token_sets_are_built_once_and_follow_a_replaced_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    config = load_config(path)
    first = config.token_sets()
    assert [s.key for s in first] == [("a", "bill"), ("a", "store"), ("b", "user")]
    assert config.token_sets() is first
    # The cache is no field: equality, repr and replace() see only the config itself.
    assert config == load_config(path)
    assert "TokenSetSpec(" not in repr(config)
    fewer = dataclasses.replace(config, merchants=config.merchants[:1])
    assert [s.key for s in fewer.token_sets()] == [("a", "bill"), ("a", "store")]


def test_the_loader_leaves_the_gc_as_it_found_it(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    assert gc.isenabled()
    load_config(path)
    assert gc.isenabled()
    (tmp_path / "broken.yaml").write_text("version: [")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "broken.yaml")
    assert gc.isenabled()
    gc.disable()
    try:
        load_config(path)
        assert not gc.isenabled()
    finally:
        gc.enable()
