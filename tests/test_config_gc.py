"""The config loader and ``Config.token_sets()`` pause the cyclic GC while they allocate,
and leave it as they found it, also when the config is broken."""

from __future__ import annotations

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


def test_the_loader_leaves_the_gc_as_it_found_it(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    assert gc.isenabled()
    config = load_config(path)
    assert gc.isenabled()
    assert [s.key for s in config.token_sets()] == [("a", "bill"), ("a", "store"), ("b", "user")]
    assert gc.isenabled()
    (tmp_path / "broken.yaml").write_text("version: [")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "broken.yaml")
    assert gc.isenabled()
    gc.disable()
    try:
        load_config(path).token_sets()
        assert not gc.isenabled()
    finally:
        gc.enable()
