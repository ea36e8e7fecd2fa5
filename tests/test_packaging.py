"""What a wheel installs for operators, against the README's install steps that use it.

An operator installs the wheel into a venv and has no source tree: every file the
README's install copies must come from the venv's ``share/anybilld/``, which the wheel fills
from the ``shared-data`` table of pyproject.toml.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
UNIT = REPO_ROOT / "packaging" / "anybilld.service"
SHARE = "share/anybilld"


def shared_data() -> dict[str, Path]:
    """Path under the environment's share/anybilld/ -> the source file the wheel takes."""
    doc = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    mapping = doc["tool"]["hatch"]["build"]["targets"]["wheel"]["shared-data"]
    installed: dict[str, Path] = {}
    for source, target in mapping.items():
        assert target == SHARE or target.startswith(SHARE + "/"), target
        src = REPO_ROOT / source
        files = [src] if src.is_file() else [f for f in src.rglob("*") if f.is_file()]
        for f in files:
            rel = target if f == src else f"{target}/{f.relative_to(src).as_posix()}"
            installed[rel.removeprefix(SHARE + "/")] = f
    return installed


def install_steps() -> str:
    """The shell block of the README's "Install on a server" section."""
    section = README.read_text().split("### Install on a server", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no shell block in the install section"
    return block.group(1)


def test_every_file_the_install_copies_comes_with_the_wheel() -> None:
    steps = install_steps()
    venv = re.search(r"python3 -m venv (\S+)", steps)
    assert venv and f"S={venv.group(1)}/{SHARE}\n" in steps
    used = re.findall(r"\$S/(\S+)", steps)
    installed = shared_data()
    assert "config.example.yaml" in used
    assert [u for u in used if u not in installed] == []
    assert installed["config.example.yaml"] == REPO_ROOT / "configs" / "example.yaml"
    # Nothing from the source tree, which a wheel install does not have.
    assert not re.search(r"(?<![\w$/])(configs|packaging)/", steps), steps
    # The unit runs the program from the venv the install creates.
    assert f"ExecStart={venv.group(1)}/bin/anybilld " in UNIT.read_text()
