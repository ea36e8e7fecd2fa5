"""The files in packaging/ checked by systemd's own tools, as an operator's install runs them.

``systemd-analyze verify`` and ``security --offline=yes`` work without systemd as PID 1;
``systemd-sysusers`` and ``systemd-tmpfiles`` run against a temporary root directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from daemon_process import REPO_ROOT
from emulator_process import EmulatorProcess, emulator_factory  # noqa: F401
from tools import require_tool

from anybilld.files import atomic_write

PACKAGING = REPO_ROOT / "packaging"
UNIT = PACKAGING / "anybilld.service"
INSTALLED_AT = "/opt/anybilld/bin/anybilld"  # where the unit expects the wheel's venv


def entry_point() -> Path:
    """The ``anybilld`` console script of the environment running the tests."""
    script = Path(sys.executable).parent / "anybilld"
    if not script.exists():
        pytest.skip(f"no anybilld console script next to {sys.executable}")
    return script


def unit_for_this_machine(folder: Path) -> Path:
    """The unit with ExecStart= pointing at this machine's anybilld, nothing else changed.

    verify checks that ExecStart's binary exists; /opt/anybilld is where an operator
    installs it, not where the tests run.
    """
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_AT} " in text
    unit = folder / "anybilld.service"
    unit.write_text(text.replace(f"ExecStart={INSTALLED_AT} ", f"ExecStart={entry_point()} "))
    return unit


def test_systemd_analyze_verify_accepts_the_unit_without_a_word(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    done = subprocess.run(
        [tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and bad values too: only silence means a clean unit.
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")


def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported on stderr."""
    tool = require_tool("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSytem="))
    done = subprocess.run(
        [tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert "ProtectSytem" in done.stderr


def exposure(unit: Path) -> float:
    tool = require_tool("systemd-analyze")
    done = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, f"no score in the output:\n{done.stdout}\n{done.stderr}"
    return float(found.group(1))


def test_the_unit_is_hardened_to_an_exposure_of_two_or_better(tmp_path: Path) -> None:
    assert exposure(unit_for_this_machine(tmp_path)) <= 2.0
    # ... and the score measures the hardening in this file: without it, it is far worse.
    bare = tmp_path / "bare" / "anybilld.service"
    bare.parent.mkdir()
    hardening = UNIT.read_text().split("# Hardening.")[1].split("[Install]")[0]
    bare.write_text(unit_for_this_machine(tmp_path).read_text().replace(hardening, "\n"))
    assert exposure(bare) > 5.0


def install_root(folder: Path) -> Path:
    """A scratch root with the sysusers.d and tmpfiles.d files where a package puts them."""
    root = folder / "root"
    for kind in ("sysusers.d", "tmpfiles.d"):
        (root / "usr/lib" / kind).mkdir(parents=True)
        shutil.copy(PACKAGING / kind / "anybilld.conf", root / "usr/lib" / kind)
    (root / "etc").mkdir()
    return root


class Ids(NamedTuple):
    uid: int  # the anybilld user
    gid: int  # its group, anybilld: the daemon's alone
    tokens_gid: int  # anybilld-tokens: the POS apps that read tokens


def run_sysusers(root: Path) -> Ids:
    """systemd-sysusers on ``root``; the ids it gave anybilld and anybilld-tokens."""
    sysusers = require_tool("systemd-sysusers")
    done = subprocess.run([sysusers, f"--root={root}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").open()}
    groups = {
        line.split(":")[0]: line.rstrip("\n").split(":") for line in (root / "etc/group").open()
    }
    user = users["anybilld"]
    uid, gid = int(user[2]), int(user[3])
    assert gid == int(groups["anybilld"][2])
    assert uid < 1000, "a system user"
    assert user[5:] == ["/var/lib/anybilld", "/usr/sbin/nologin\n"]
    # The daemon's group has no other member; the token readers' group has the daemon, so
    # that it may give token files that group.
    assert groups["anybilld"][3] == ""
    assert groups["anybilld-tokens"][3] == "anybilld"
    tokens_gid = int(groups["anybilld-tokens"][2])
    assert tokens_gid < 1000 and tokens_gid != gid
    return Ids(uid, gid, tokens_gid)


def test_sysusers_creates_the_anybilld_system_user_and_groups(tmp_path: Path) -> None:
    run_sysusers(install_root(tmp_path))


def run_tmpfiles(root: Path) -> None:
    tmpfiles = require_tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to give the directories their owners")
    done = subprocess.run([tmpfiles, f"--root={root}", "--create"], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, "")


def test_tmpfiles_creates_the_directories_with_their_owners_and_modes(tmp_path: Path) -> None:
    root = install_root(tmp_path)
    uid, gid, tokens_gid = run_sysusers(root)
    # An install of an earlier layout: tokens/ came from StateDirectory=, group anybilld.
    (root / "var/lib/anybilld/tokens").mkdir(parents=True)
    for d in ("var/lib/anybilld", "var/lib/anybilld/tokens"):
        os.chown(root / d, uid, gid)
        os.chmod(root / d, 0o750)
    run_tmpfiles(root)

    def owner_mode(path: str) -> tuple[int, int, str]:
        st = (root / path).stat()
        return st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)

    assert owner_mode("etc/anybilld") == (0, gid, "0o750")
    assert owner_mode("etc/anybilld/secrets") == (uid, gid, "0o700")
    assert owner_mode("etc/anybilld/merchants.d") == (0, gid, "0o750")
    assert owner_mode("etc/anybilld/credentials") == (0, 0, "0o700")
    assert owner_mode("var/lib/anybilld") == (uid, gid, "0o751")
    # POS apps in group anybilld-tokens can reach the tokens, never the refresh tokens.
    assert owner_mode("var/lib/anybilld/tokens") == (uid, tokens_gid, "0o750")
    assert owner_mode("var/lib/anybilld/state") == (uid, gid, "0o700")


# What a process can open: one line per path, "ok" if it can read the file or list the
# directory. A shell, not Python: the interpreter running the tests may live where other
# users cannot run it (a pyenv under /root).
OPEN_PROBE = """
for p; do
    if [ -d "$p" ]; then ls -- "$p" >/dev/null 2>&1; else cat -- "$p" >/dev/null 2>&1; fi \\
        && echo ok || echo no
done
"""


def can_open(paths: list[Path], *, uid: int, gid: int, groups: list[int]) -> list[Path]:
    """The paths a process of these ids can read (a file) or list (a directory)."""
    done = subprocess.run(
        ["/bin/sh", "-c", OPEN_PROBE, "sh", *map(str, paths)],
        user=uid,
        group=gid,
        extra_groups=groups,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [p for p, line in zip(paths, done.stdout.split(), strict=True) if line == "ok"]


def test_a_token_reader_reads_the_tokens_but_never_the_config_or_the_secrets() -> None:
    """The install of the README in a scratch root: the config as `install -m 0640 -g
    anybilld`, a password file as `install -m 0600 -o anybilld`, a token file written by
    anybilld's own writer for group anybilld-tokens, a state file as the daemon keeps it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create files of other owners and run as other users")
    # Not under pytest's tmp_path: its parents are root's alone, and the processes below
    # must reach the scratch root as they would reach the paths of their own system.
    folder = Path(tempfile.mkdtemp(prefix="anybilld-root-"))
    try:
        folder.chmod(0o755)
        root = install_root(folder)
        root.chmod(0o755)
        ids = run_sysusers(root)
        run_tmpfiles(root)
        etc, lib = root / "etc/anybilld", root / "var/lib/anybilld"

        config = etc / "config.yaml"
        config.write_text("version: 1\n")
        os.chown(config, 0, ids.gid)
        config.chmod(0o640)
        secret = etc / "secrets/berlin-01"
        secret.write_text("the-password\n")
        os.chown(secret, ids.uid, ids.gid)
        secret.chmod(0o600)
        token = lib / "tokens/berlin-01/bill.json"
        atomic_write(token, b"{}", mode=0o640, group=ids.tokens_gid, root=lib / "tokens")
        state = lib / "state/berlin-01/bill.json"
        state.parent.mkdir(mode=0o700)
        state.write_text("{}")
        for path in (state.parent, state):
            os.chown(path, ids.uid, ids.gid)
        state.chmod(0o600)
        paths = [etc, config, etc / "secrets", secret, lib, lib / "state", state]
        paths += [lib / "tokens", token.parent, token]

        # A POS app, in group anybilld-tokens only: the tokens, and nothing else.
        pos = can_open(paths, uid=64999, gid=64999, groups=[ids.tokens_gid])
        assert pos == [lib / "tokens", token.parent, token]
        # The daemon: all of it but the directory listings it does not need.
        daemon = can_open(paths, uid=ids.uid, gid=ids.gid, groups=[ids.tokens_gid])
        assert daemon == paths
    finally:
        shutil.rmtree(folder)


# --------------------------------------------------------------------- MemoryDenyWriteExecute

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
# Run the rest of the command line with W^X enforced by the kernel, as the unit's
# MemoryDenyWriteExecute=yes does (the setting is inherited by children and across exec).
MDWE_WRAPPER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""


def mdwe(*command: str) -> list[str]:
    return [sys.executable, "-c", MDWE_WRAPPER, *command]


def mdwe_available() -> bool:
    return subprocess.run(mdwe(sys.executable, "-c", "pass")).returncode == 0


def test_the_daemon_works_with_memory_deny_write_execute(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
) -> None:
    if not mdwe_available():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux 6.3 or newer)")
    # The wrapper really enforces W^X: a writable and executable mapping is refused.
    probe = mdwe(
        sys.executable,
        "-c",
        "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)",
    )
    refused = subprocess.run(probe, capture_output=True, text=True)
    assert refused.returncode != 0 and "PermissionError" in refused.stderr

    emu = emulator_factory({"users": [{"username": "svc-berlin", "password": "berlin-Pa55"}]})
    (tmp_path / "pw").write_text("berlin-Pa55\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        "version: 1\n"
        "output_dir: tokens\nstate_dir: state\nlisten: 127.0.0.1:0\n"
        "identity:\n"
        f"  token_url: {emu.base_url}/ad.anybill.de/oauth2/v2.0/token\n"
        "  client_id: anybilld-demo-client\n"
        "merchants:\n"
        "  - {id: berlin, username: svc-berlin, password_file: pw, scopes: [bill]}\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # A whole run: config, httpx with ssl, a token fetched and written.
    done = subprocess.run(
        mdwe(sys.executable, "-m", "anybilld", "--config", str(config), "--once"),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tokens/berlin/bill.json").exists()
