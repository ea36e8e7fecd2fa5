"""The directories the daemon prepares at start, on real files: exact modes whatever the
process umask, and an existing directory left as the operator made it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from anybilld.config import load_config
from anybilld.daemon import Daemon

CONFIG = """\
version: 1
identity:
  client_id: c
  token_url: https://idp.invalid/token
output_dir: {output_dir}
state_dir: {state_dir}
merchants: []
"""


@pytest.fixture
def umask_0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def prepare(tmp_path: Path, output_dir: Path, state_dir: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG.format(output_dir=output_dir, state_dir=state_dir))
    Daemon(config_path=cfg)._prepare_directories(load_config(cfg))


def test_start_creates_output_dir_0755_under_umask_0(tmp_path: Path, umask_0: None) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    os.chmod(lib, 0o750)  # the operator's: left as it is
    out = lib / "anybilld" / "tokens"
    prepare(tmp_path, out, tmp_path / "state")
    # Not 0777: nobody but the daemon may add or replace files where tokens are read.
    assert mode_of(out) == 0o755
    assert mode_of(out.parent) == 0o755
    assert mode_of(lib) == 0o750
    assert mode_of(tmp_path / "state") == 0o700
