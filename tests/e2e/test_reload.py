"""Hot reload end to end: the daemon as a subprocess, the real emulator, real files.

Every way an operator saves a config (editor, ``sed -i``, Ansible's rename, a Kubernetes
ConfigMap's symlink swap) must be picked up by the watcher alone, and must apply exactly
the difference: the emulator's request record shows who logged in, the token files show
who was left alone (same bytes, same mtime) and who went away.

Tokens live a day (the emulator's default), so no refresh happens during a test: every
request in the record after a change was caused by the change.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_process import DaemonProcess, merchant, wait_for
from emulator_process import EmulatorProcess, emulator_factory  # noqa: F401

USERS = {
    "berlin": ("svc-berlin", "berlin-Pa55"),
    "hamburg": ("svc-hamburg", "hamburg-Pa55"),
    "munich": ("svc-munich", "munich-Pa55"),
}
REFRESH = {"retry_initial": "0.2", "retry_max": "2", "blocked_retry": "1h"}


@pytest.fixture
def emu(emulator_factory: Callable[..., EmulatorProcess]) -> EmulatorProcess:  # noqa: F811
    return emulator_factory({"users": [{"username": u, "password": p} for u, p in USERS.values()]})


def m(mid: str, **extra: Any) -> dict[str, Any]:
    user, pw = USERS[mid]
    return merchant(mid, user, pw, ["bill"], **extra)


def config(emu: EmulatorProcess, merchants: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "version": 1,
        "identity": {
            "token_url": f"{emu.base_url}/ad.anybill.de/oauth2/v2.0/token",
            "client_id": "anybilld-demo-client",
            "timeout": "3",
        },
        "refresh": dict(REFRESH),
        "merchants": merchants,
    }
    cfg.update(extra)
    return cfg


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def start(daemons: list[DaemonProcess], folder: Path, cfg: dict[str, Any]) -> DaemonProcess:
    d = DaemonProcess(folder, cfg, passwords=[p for _, p in USERS.values()])
    daemons.append(d)
    return d


def reloads(d: DaemonProcess, outcome: str) -> float:
    return d.metrics().get(f'anybilld_config_reloads_total{{outcome="{outcome}"}}', 0.0)


def live(d: DaemonProcess) -> set[str]:
    return {m for m, _ in d.token_sets()}


def published(d: DaemonProcess, mids: set[str]) -> bool:
    return all(t["state"] == "ok" for k, t in d.token_sets().items() if k[0] in mids) and all(
        d.read_json(mid, "bill") is not None for mid in mids
    )


def snapshot(d: DaemonProcess, mid: str) -> tuple[bytes, int]:
    path = d.token_file(mid, "bill")
    return path.read_bytes(), path.stat().st_mtime_ns


def password_logins(emu: EmulatorProcess, since: int) -> list[str]:
    return [r["username"] for r in emu.requests(since) if r["grant_type"] == "password"]


def last_request_id(emu: EmulatorProcess) -> int:
    record = emu.requests()
    return int(record[-1]["id"]) if record else 0


def wait_reloaded(d: DaemonProcess, outcome: str, before: float) -> None:
    wait_for(lambda: reloads(d, outcome) > before, what=f"a reload with outcome {outcome}")


# --------------------------------------------------------------------------- ways of saving

Save = Callable[[DaemonProcess, Path, str], None]


def in_place(d: DaemonProcess, path: Path, text: str) -> None:
    """``>`` in a shell or nano: truncate, then write; the daemon sees the empty file first."""
    failures = reloads(d, "failure")
    with path.open("r+") as f:
        f.truncate(0)
    wait_reloaded(d, "failure", failures)  # the empty file was read and refused
    with path.open("r+") as f:
        f.write(text)


def rename_same_dir(d: DaemonProcess, path: Path, text: str) -> None:
    """Ansible, Puppet, ``sed -i``: a temp file beside it, renamed over."""
    tmp = path.with_name(".config.yaml.tmp123")
    tmp.write_text(text)
    os.replace(tmp, path)


def rename_other_dir(d: DaemonProcess, path: Path, text: str) -> None:
    """Written elsewhere on the same filesystem, then moved in."""
    other = d.folder.parent / "staging"
    other.mkdir(exist_ok=True)
    (other / "config.yaml").write_text(text)
    os.replace(other / "config.yaml", path)


def delete_recreate(d: DaemonProcess, path: Path, text: str) -> None:
    failures = reloads(d, "failure")
    path.unlink()
    wait_reloaded(d, "failure", failures)  # the missing file was noticed and refused
    path.write_text(text)


def vim_dance(d: DaemonProcess, path: Path, text: str) -> None:
    """vim's default with backupcopy=no: rename the original to ``file~``, write a new file,
    delete the backup."""
    backup = path.with_name(path.name + "~")
    os.rename(path, backup)
    path.write_text(text)
    backup.unlink()


@pytest.mark.parametrize(
    "save", [in_place, rename_same_dir, rename_other_dir, delete_recreate, vim_dance]
)
def test_every_way_of_saving_applies_exactly_the_difference(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess], save: Save
) -> None:
    d = start(daemons, tmp_path / "d", config(emu, [m("berlin"), m("hamburg")]))
    wait_for(lambda: published(d, {"berlin", "hamburg"}), what="first tokens")
    assert_exact_difference(d, emu, lambda text: save(d, d.config_path, text))
    assert d.stop() == 0


def assert_exact_difference(
    d: DaemonProcess, emu: EmulatorProcess, write: Callable[[str], None]
) -> None:
    """Replace hamburg by munich: berlin untouched, munich logs in, hamburg's files go."""
    berlin = snapshot(d, "berlin")
    hamburg_file = d.token_file("hamburg", "bill")
    mark = last_request_id(emu)
    successes = reloads(d, "success")

    cfg = dict(d.config, merchants=[m("berlin"), m("munich")])
    write(dump(cfg))

    wait_for(lambda: live(d) == {"berlin", "munich"}, what="munich in, hamburg out")
    wait_for(lambda: published(d, {"munich"}), what="munich's token")
    wait_for(lambda: not hamburg_file.exists(), what="hamburg's token file removed")
    assert reloads(d, "success") > successes
    assert d.metrics()["anybilld_config_last_reload_successful"] == 1
    # Exactly one new login, munich's; berlin's file was not even rewritten.
    assert password_logins(emu, mark) == ["svc-munich"]
    assert [r["grant_type"] for r in emu.requests(mark)] == ["password"]
    assert snapshot(d, "berlin") == berlin
    assert "config reloaded: added=1 changed=0 removed=1 unchanged=1" in d.log()


def test_a_configmap_symlink_swap_is_a_change(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess]
) -> None:
    """The layout a Kubernetes ConfigMap volume has, updated the way the kubelet does it."""
    folder = tmp_path / "d"
    d = DaemonProcess(
        folder,
        config(emu, [m("berlin"), m("hamburg")]),
        passwords=[p for _, p in USERS.values()],
        start=False,
    )
    daemons.append(d)
    first = folder / "..2026_12_03_10_00_00.1"
    first.mkdir()
    os.replace(d.config_path, first / "config.yaml")
    (folder / "..data").symlink_to(first.name)
    d.config_path.symlink_to("..data/config.yaml")
    d.start()
    wait_for(lambda: published(d, {"berlin", "hamburg"}), what="first tokens")

    def swap(text: str) -> None:
        second = folder / "..2026_12_03_10_05_00.2"
        second.mkdir()
        (second / "config.yaml").write_text(text)
        (folder / "..data_tmp").symlink_to(second.name)
        os.replace(folder / "..data_tmp", folder / "..data")
        (first / "config.yaml").unlink()
        first.rmdir()

    assert_exact_difference(d, emu, swap)
    assert d.stop() == 0


def test_polling_mode_notices_a_change(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess]
) -> None:
    cfg = config(emu, [m("berlin"), m("hamburg")], reload={"watch": "poll", "poll_interval": 0.2})
    d = start(daemons, tmp_path / "d", cfg)
    wait_for(lambda: published(d, {"berlin", "hamburg"}), what="first tokens")
    assert "for config changes (poll)" in d.log()
    assert_exact_difference(d, emu, lambda text: rename_same_dir(d, d.config_path, text))
    assert d.stop() == 0


# --------------------------------------------------------------------------- invalid saves


DUPLICATE_KEY = "version: 1\nversion: 1\nmerchants: []\n"


@pytest.mark.parametrize(
    ("what", "content"),
    [
        ("invalid YAML", b"version: 1\nmerchants: [\n  - id: berlin\n"),
        ("empty", b""),
        ("not UTF-8", b"version: 1\n# \xff\xfe caf\xe9\n"),
        ("duplicate key", DUPLICATE_KEY.encode()),
    ],
)
def test_a_broken_save_keeps_the_tokens_and_the_next_valid_one_applies(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess], what: str, content: bytes
) -> None:
    d = start(daemons, tmp_path / "d", config(emu, [m("berlin"), m("hamburg")]))
    wait_for(lambda: published(d, {"berlin", "hamburg"}), what="first tokens")
    before = {mid: snapshot(d, mid) for mid in ("berlin", "hamburg")}
    mark = last_request_id(emu)
    failures = reloads(d, "failure")

    tmp = d.config_path.with_name("config.yaml.new")
    tmp.write_bytes(content)
    os.replace(tmp, d.config_path)

    wait_reloaded(d, "failure", failures)
    metrics = d.metrics()
    assert metrics["anybilld_config_last_reload_successful"] == 0
    assert live(d) == {"berlin", "hamburg"}
    assert {mid: snapshot(d, mid) for mid in before} == before
    assert d.get("/readyz").status_code == 200
    assert "reload failed, keeping the running config" in d.log()
    assert emu.requests(mark) == []

    # The next valid version applies: munich joins, nothing else moves.
    assert_exact_difference(d, emu, lambda text: rename_same_dir(d, d.config_path, text))
    assert d.stop() == 0


# --------------------------------------------------------------------------- merchants.d


def test_a_file_added_to_and_removed_from_merchants_d(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess]
) -> None:
    cfg = config(emu, [m("berlin")], include=["merchants.d/*.yaml"])
    folder = tmp_path / "d"
    (folder / "merchants.d").mkdir(parents=True)
    d = start(daemons, folder, cfg)
    wait_for(lambda: published(d, {"berlin"}), what="berlin's token")
    berlin = snapshot(d, "berlin")
    mark = last_request_id(emu)

    # Not matching the glob: no reload, nothing happens.
    (folder / "merchants.d" / "README").write_text("one file per store\n")
    (folder / "merchants.d" / "munich.yaml").write_text(dump({"merchants": [m("munich")]}))
    wait_for(lambda: published(d, {"munich"}), what="munich from merchants.d")
    assert live(d) == {"berlin", "munich"}
    assert password_logins(emu, mark) == ["svc-munich"]

    munich_file = d.token_file("munich", "bill")
    (folder / "merchants.d" / "munich.yaml").unlink()
    wait_for(lambda: live(d) == {"berlin"}, what="munich removed")
    wait_for(lambda: not munich_file.exists(), what="munich's file removed")
    munich_state = d.state_dir / "munich"
    wait_for(
        lambda: not munich_state.exists() or not any(munich_state.iterdir()),
        what="munich's state removed",
    )
    assert password_logins(emu, mark) == ["svc-munich"]
    assert snapshot(d, "berlin") == berlin

    # The directory itself deleted and created again (a redeploy): still watched.
    (folder / "merchants.d" / "README").unlink()
    (folder / "merchants.d").rmdir()
    (folder / "merchants.d").mkdir()
    (folder / "merchants.d" / "hamburg.yaml").write_text(dump({"merchants": [m("hamburg")]}))
    wait_for(lambda: published(d, {"hamburg"}), what="hamburg from the new merchants.d")
    assert live(d) == {"berlin", "hamburg"}
    assert password_logins(emu, mark) == ["svc-munich", "svc-hamburg"]
    assert d.stop() == 0


def start_with_munich_in_merchants_d(
    daemons: list[DaemonProcess], folder: Path, emu: EmulatorProcess
) -> DaemonProcess:
    """berlin in the main file, munich in merchants.d/stores.yaml, both published."""
    (folder / "merchants.d").mkdir(parents=True)
    (folder / "merchants.d" / "stores.yaml").write_text(dump({"merchants": [m("munich")]}))
    d = start(daemons, folder, config(emu, [m("berlin")], include=["merchants.d/*.yaml"]))
    wait_for(lambda: published(d, {"berlin", "munich"}), what="first tokens")
    return d


def test_a_directory_swapped_for_a_new_one_stays_watched(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess]
) -> None:
    """A deploy that builds the new ``merchants.d`` beside the old one and swaps them by
    renaming; later edits land in the new directory and must still be seen."""
    folder = tmp_path / "d"
    d = start_with_munich_in_merchants_d(daemons, folder, emu)
    mark = last_request_id(emu)

    new = folder / "merchants.d.new"
    new.mkdir()
    (new / "stores.yaml").write_text(dump({"merchants": [m("munich"), m("hamburg")]}))
    os.rename(folder / "merchants.d", folder / "merchants.d.old")
    os.rename(new, folder / "merchants.d")
    wait_for(lambda: published(d, {"hamburg"}), what="hamburg from the swapped-in directory")

    # An edit inside the directory that replaced the watched one (same file names).
    (folder / "merchants.d" / "stores.yaml").write_text(dump({"merchants": [m("hamburg")]}))
    wait_for(lambda: live(d) == {"berlin", "hamburg"}, what="munich gone after the edit")
    assert password_logins(emu, mark) == ["svc-hamburg"]
    assert d.stop() == 0


def test_a_directory_missing_while_it_is_swapped_removes_no_merchant(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess]
) -> None:
    """``mv merchants.d merchants.d.old`` and, a moment later, the new one moved in: the
    reload in between fails (the include's directory is gone) instead of removing every
    merchant it held, with their files and grants."""
    folder = tmp_path / "d"
    d = start_with_munich_in_merchants_d(daemons, folder, emu)
    munich = snapshot(d, "munich")
    mark = last_request_id(emu)
    failures = reloads(d, "failure")

    os.rename(folder / "merchants.d", folder / "merchants.d.old")
    wait_reloaded(d, "failure", failures)
    assert "no such directory" in d.log()
    assert live(d) == {"berlin", "munich"}
    assert snapshot(d, "munich") == munich

    new = folder / "merchants.d.new"
    new.mkdir()
    (new / "stores.yaml").write_text(dump({"merchants": [m("munich"), m("hamburg")]}))
    os.rename(new, folder / "merchants.d")
    wait_for(lambda: published(d, {"hamburg"}), what="hamburg from the new directory")
    assert live(d) == {"berlin", "munich", "hamburg"}
    assert password_logins(emu, mark) == ["svc-hamburg"]
    assert snapshot(d, "munich") == munich
    assert d.stop() == 0


def test_a_symlinked_directory_swapped_atomically_applies_the_new_version(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess]
) -> None:
    """The README's atomic way: versions side by side, ``merchants.d`` a link swapped by
    ``mv -T``; then an edit inside the new version."""
    cfg = config(emu, [m("berlin")], include=["merchants.d/*.yaml"])
    folder = tmp_path / "d"
    (folder / "merchants.v1").mkdir(parents=True)
    (folder / "merchants.v1" / "stores.yaml").write_text(dump({"merchants": [m("munich")]}))
    (folder / "merchants.d").symlink_to("merchants.v1")
    d = start(daemons, folder, cfg)
    wait_for(lambda: published(d, {"berlin", "munich"}), what="first tokens")
    munich = snapshot(d, "munich")
    mark = last_request_id(emu)

    (folder / "merchants.v2").mkdir()
    (folder / "merchants.v2" / "stores.yaml").write_text(
        dump({"merchants": [m("munich"), m("hamburg")]})
    )
    (folder / "merchants.d.tmp").symlink_to("merchants.v2")
    os.replace(folder / "merchants.d.tmp", folder / "merchants.d")
    wait_for(lambda: published(d, {"hamburg"}), what="hamburg from the new version")
    assert snapshot(d, "munich") == munich

    (folder / "merchants.v2" / "stores.yaml").write_text(dump({"merchants": [m("hamburg")]}))
    wait_for(lambda: live(d) == {"berlin", "hamburg"}, what="munich gone after an edit")
    assert password_logins(emu, mark) == ["svc-hamburg"]
    assert d.stop() == 0


# --------------------------------------------------------------------------- removal


@pytest.mark.parametrize("on_remove", ["delete", "keep"])
def test_a_removed_merchant_leaves_no_series_and_its_files_go_per_on_remove(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess], on_remove: str
) -> None:
    cfg = config(emu, [m("berlin"), m("hamburg")], on_remove=on_remove)
    d = start(daemons, tmp_path / "d", cfg)
    wait_for(lambda: published(d, {"berlin", "hamburg"}), what="first tokens")
    assert any('merchant="hamburg"' in k for k in d.metrics())
    hamburg = d.token_file("hamburg", "bill")

    rename_same_dir(d, d.config_path, dump(dict(d.config, merchants=[m("berlin")])))
    wait_for(lambda: live(d) == {"berlin"}, what="hamburg removed")

    assert [k for k in d.metrics() if 'merchant="hamburg"' in k] == []
    assert any('merchant="berlin"' in k for k in d.metrics())
    if on_remove == "delete":
        wait_for(lambda: not hamburg.exists(), what="hamburg's file removed")
    else:
        assert hamburg.exists() and d.read_json("hamburg", "bill") is not None
    assert d.stop() == 0


# --------------------------------------------------------------------------- scale and bursts


def test_one_password_changed_among_1000_token_sets_logs_in_exactly_one_merchant(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    daemons: list[DaemonProcess],
) -> None:
    n = 1000
    users = [(f"m{i:04d}", f"svc-m{i:04d}", f"pw-{i:04d}-Secret") for i in range(n)]
    emu = emulator_factory({"users": [{"username": u, "password": p} for _, u, p in users]})
    cfg = config(emu, [merchant(mid, u, p, ["bill"]) for mid, u, p in users])
    cfg["identity"].update(max_requests_per_second=1000, max_concurrent_requests=32)
    d = DaemonProcess(tmp_path / "d", cfg, passwords=["pw-new-Secret"])
    daemons.append(d)
    files = [d.token_file(mid, "bill") for mid, _, _ in users]
    wait_for(lambda: all(f.exists() for f in files), timeout=180, what="1000 token files")
    wait_for(lambda: d.get("/readyz").status_code == 200, timeout=60, what="all ready")
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    mark = last_request_id(emu)

    changed, user, _ = users[500]
    emu.add_user(user, "pw-new-Secret")
    cfg = d.config
    cfg["merchants"][500]["password"] = "pw-new-Secret"
    rename_same_dir(d, d.config_path, dump(cfg))

    target = d.token_file(changed, "bill")
    wait_for(lambda: target.read_bytes() != before[target][0], what="the new login's token")
    assert password_logins(emu, mark) == [user]
    assert [r["grant_type"] for r in emu.requests(mark)] == ["password"]
    untouched = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files if f != target}
    assert untouched == {f: v for f, v in before.items() if f != target}
    assert "config reloaded: added=0 changed=1 removed=0 unchanged=999" in d.log()
    assert d.stop() == 0


def test_a_burst_of_sighups_with_the_file_changing_ends_equal_to_the_file(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess]
) -> None:
    d = start(daemons, tmp_path / "d", config(emu, [m("berlin")]))
    wait_for(lambda: published(d, {"berlin"}), what="berlin's token")
    variants = [[m("berlin")], [m("berlin"), m("munich")], [m("hamburg")], [m("munich")]]
    for i in range(50):
        rename_same_dir(d, d.config_path, dump(dict(d.config, merchants=variants[i % 4])))
        d.signal(signal.SIGHUP)
    final = [m("berlin"), m("hamburg")]
    rename_same_dir(d, d.config_path, dump(dict(d.config, merchants=final)))
    d.signal(signal.SIGHUP)

    wait_for(lambda: live(d) == {"berlin", "hamburg"}, what="the last version applied")
    wait_for(lambda: published(d, {"berlin", "hamburg"}), what="its tokens")
    wait_for(lambda: not d.token_file("munich", "bill").exists(), what="munich's file gone")
    metrics = d.metrics()
    total = reloads(d, "success") + reloads(d, "failure")
    # Each SIGHUP asks for at most one reload, and signals during a reload coalesce into
    # one; the watcher's debounced bursts add at most one each.
    assert 1 <= total <= 51 + 51
    assert metrics["anybilld_config_last_reload_successful"] == 1
    assert d.stop() == 0


# --------------------------------------------------------------------------- password rotation


def test_a_mistyped_new_password_never_drops_the_working_token(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    daemons: list[DaemonProcess],
) -> None:
    users = [{"username": u, "password": p} for u, p in USERS.values()]
    emu = emulator_factory({"users": users, "access_token_lifetime": 4})
    d = start(daemons, tmp_path / "d", config(emu, [m("berlin")]))
    d.passwords |= {"berlin-typo", "berlin-New5"}
    wait_for(lambda: published(d, {"berlin"}), what="berlin's token")
    # The password is rotated at the IdP; the operator mistypes the new one.
    emu.add_user("svc-berlin", "berlin-New5")
    mark = last_request_id(emu)

    typo = dict(m("berlin"), password="berlin-typo")
    rename_same_dir(d, d.config_path, dump(dict(d.config, merchants=[typo])))

    def refreshed_after_refusal() -> bool:
        record = emu.requests(mark)
        refused = [r["id"] for r in record if r["grant_type"] == "password"]
        return bool(refused) and any(
            r["grant_type"] == "refresh_token" and r["id"] > refused[0] and r["status"] == 200
            for r in record
        )

    wait_for(refreshed_after_refusal, what="a refresh with the old grant after the refusal")
    blocked = 'anybilld_token_blocked{merchant="berlin",reason="credentials",scope="bill"}'
    wait_for(lambda: d.metrics().get(blocked) == 1, what="the refusal shown on /metrics")

    # The token consumers read is valid and was issued after the refusal.
    def valid_token_published() -> bool:
        doc = d.read_json("berlin", "bill")
        return doc is not None and bool(emu.introspect(doc["access_token"])["active"])

    wait_for(valid_token_published, what="a valid token in the file")
    assert password_logins(emu, mark) == ["svc-berlin"]  # tried once, not again and again

    # The fix logs in at once; the token set is ok again.
    fixed = dict(m("berlin"), password="berlin-New5")
    rename_same_dir(d, d.config_path, dump(dict(d.config, merchants=[fixed])))
    wait_for(lambda: password_logins(emu, mark) == ["svc-berlin"] * 2, what="the fixed login")
    wait_for(lambda: d.token_sets()[("berlin", "bill")]["state"] == "ok", what="ok again")
    assert d.stop() == 0


def test_a_rotated_password_file_logs_in_that_merchant_alone(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess]
) -> None:
    folder = tmp_path / "d"
    secrets = folder / "secrets"
    secrets.mkdir(parents=True)
    (secrets / "berlin").write_text(USERS["berlin"][1] + "\n")
    berlin = {k: v for k, v in m("berlin").items() if k != "password"}
    berlin["password_file"] = "secrets/berlin"
    d = start(daemons, folder, config(emu, [berlin, m("hamburg")]))
    d.passwords.add("berlin-Rotated1")
    wait_for(lambda: published(d, {"berlin", "hamburg"}), what="first tokens")
    hamburg = snapshot(d, "hamburg")
    mark = last_request_id(emu)

    emu.add_user("svc-berlin", "berlin-Rotated1")
    rename_same_dir(d, secrets / "berlin", "berlin-Rotated1\n")

    wait_for(lambda: password_logins(emu, mark) == ["svc-berlin"], what="berlin's new login")
    wait_for(lambda: published(d, {"berlin"}), what="berlin ok")
    assert snapshot(d, "hamburg") == hamburg
    assert "config reloaded: added=0 changed=1 removed=0 unchanged=1" in d.log()
    assert d.stop() == 0


def test_a_password_changed_while_stopped_logs_in_at_start_like_a_reload(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess]
) -> None:
    folder = tmp_path / "d"
    d = start(daemons, folder, config(emu, [m("berlin"), m("hamburg")]))
    wait_for(lambda: published(d, {"berlin", "hamburg"}), what="first tokens")
    assert d.stop() == 0
    hamburg = snapshot(d, "hamburg")
    mark = last_request_id(emu)

    emu.add_user("svc-berlin", "berlin-Rotated2")
    rotated = dict(m("berlin"), password="berlin-Rotated2")
    again = start(daemons, folder, config(emu, [rotated, m("hamburg")]))
    again.passwords.add("berlin-Rotated2")
    wait_for(lambda: password_logins(emu, mark) == ["svc-berlin"], what="berlin's new login")
    wait_for(lambda: published(again, {"berlin", "hamburg"}), what="both ok")
    # hamburg's stored grant is reused without any request; berlin's files hold a token
    # of the new login.
    assert [r["username"] for r in emu.requests(mark)] == ["svc-berlin"]
    assert snapshot(again, "hamburg") == hamburg
    assert again.stop() == 0


def test_new_outputs_and_timing_rewrite_files_without_a_request(
    tmp_path: Path, emu: EmulatorProcess, daemons: list[DaemonProcess]
) -> None:
    d = start(daemons, tmp_path / "d", config(emu, [m("berlin"), m("hamburg")]))
    wait_for(lambda: published(d, {"berlin", "hamburg"}), what="first tokens")
    before = {mid: snapshot(d, mid) for mid in ("berlin", "hamburg")}
    token = (d.read_json("berlin", "bill") or {})["access_token"]
    due = {k[0]: t["next_refresh_at"] for k, t in d.token_sets().items()}
    mark = last_request_id(emu)

    raw = {"path": "raw/{merchant}-{scope}", "format": "raw", "mode": "0600"}
    berlin = dict(m("berlin"), outputs=[{"path": "{merchant}/{scope}.json"}, raw])
    cfg = dict(d.config, merchants=[berlin, m("hamburg")])
    cfg["refresh"] = dict(REFRESH, at=0.3, jitter=0.05)
    rename_same_dir(d, d.config_path, dump(cfg))

    raw_file = d.output_dir / "raw" / "berlin-bill"
    wait_for(raw_file.exists, what="berlin's new raw output")
    assert raw_file.read_text() == token  # the token held, no new login
    assert "config reloaded: added=0 changed=2 removed=0 unchanged=0" in d.log()
    assert emu.requests(mark) == []
    assert {mid: snapshot(d, mid) for mid in before} == before
    # Rescheduled at 30 % ± 5 % of the lifetime instead of 50 % ± 10 %: earlier.
    now_due = {k[0]: t["next_refresh_at"] for k, t in d.token_sets().items()}
    assert all(now_due[mid] < due[mid] for mid in due), (due, now_due)
    assert d.stop() == 0
