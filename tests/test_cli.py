"""``anybilld --check``: what it tells an operator before the start."""

from __future__ import annotations

from pathlib import Path

import pytest

from anybilld.cli import check

CONFIG = """\
version: 1
identity:
  client_id: abc
merchants:
  - id: m1
    username: u1
    password: Pa55-secret
    scopes: [bill, store]
    outputs:
      - path: "{merchant}/{scope}.json"
        group: anybilld-no-such-group
      - path: "{merchant}/{scope}.env"
        format: env
        group: 0
"""


def test_check_warns_of_an_output_group_this_host_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    assert check(path) == 0  # valid: the group may be created before the start
    out = capsys.readouterr()
    assert "OK, 1 merchants, 2 token sets, 4 token files" in out.out
    warnings = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: group 'anybilld-no-such-group' does not exist on this host; the token "
        "files of m1 cannot be written until it does"
    ]
    assert "Pa55-secret" not in out.out + out.err
