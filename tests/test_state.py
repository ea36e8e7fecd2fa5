"""The state store, on real files: round trips, modes, and corrupt files that never raise."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anybilld.errors import OutputError
from anybilld.secret import Secret
from anybilld.state import StateStore, StoredGrant

REFRESH = "SECRET-refresh-eyJraWQiOiJyZWZyZXNoIn0"
ACCESS = "SECRET-access-eyJhbGciOiJSUzI1NiJ9"
GRANT = StoredGrant(
    fingerprint="3f" * 32,
    refresh_token=Secret(REFRESH),
    refresh_token_expires_at=1_807_776_000.5,
    first_sign_in_at=1_800_000_000.0,
    access_token=Secret(ACCESS),
    access_token_expires_at=1_800_003_600.25,
    obtained_at=1_800_000_000.125,
)
EMPTY_GRANT = StoredGrant(
    fingerprint="ab" * 32,
    refresh_token=None,
    refresh_token_expires_at=None,
    first_sign_in_at=1_800_000_000,
    access_token=None,
    access_token_expires_at=None,
    obtained_at=1_800_000_000,
)


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    s = StateStore(tmp_path / "state")
    s.prepare()
    return s


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def valid_doc() -> dict[str, Any]:
    return {
        "version": 1,
        "fingerprint": GRANT.fingerprint,
        "refresh_token": REFRESH,
        "refresh_token_expires_at": 1_807_776_000.5,
        "first_sign_in_at": 1_800_000_000.0,
        "access_token": ACCESS,
        "access_token_expires_at": 1_800_003_600.25,
        "obtained_at": 1_800_000_000.125,
    }


def with_field(**changes: Any) -> bytes:
    doc = valid_doc()
    for key, value in changes.items():
        if value is _DROP:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc).encode()


_DROP = object()


# --- round trips and modes -------------------------------------------------------------


@pytest.mark.parametrize("grant", [GRANT, EMPTY_GRANT], ids=["full", "no-tokens"])
def test_round_trip(store: StateStore, grant: StoredGrant) -> None:
    store.save("berlin-01", "bill", grant)
    assert store.load("berlin-01", "bill") == grant


def test_path_layout(store: StateStore, tmp_path: Path) -> None:
    assert store.path("berlin-01", "bill") == tmp_path / "state" / "berlin-01" / "bill.json"
    store.save("berlin-01", "bill", GRANT)
    doc = json.loads(store.path("berlin-01", "bill").read_bytes())
    assert doc["version"] == 1
    assert doc["refresh_token"] == REFRESH


def test_modes_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        store = StateStore(tmp_path / "var" / "state")
        store.prepare()
        store.save("berlin-01", "bill", GRANT)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "var" / "state") == 0o700
    assert mode_of(tmp_path / "var" / "state" / "berlin-01") == 0o700
    assert mode_of(store.path("berlin-01", "bill")) == 0o600


def test_prepare_tightens_a_loose_directory(tmp_path: Path, caplog: Any) -> None:
    (tmp_path / "state").mkdir()
    os.chmod(tmp_path / "state", 0o755)
    with caplog.at_level(logging.WARNING, logger="anybilld.state"):
        StateStore(tmp_path / "state").prepare()
    assert mode_of(tmp_path / "state") == 0o700
    assert "0755" in caplog.text


def test_prepare_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_bytes(b"")
    with pytest.raises(OutputError):
        StateStore(tmp_path / "state").prepare()


def test_save_without_prepare_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        StateStore(tmp_path / "state").save("m", "s", GRANT)


def test_save_replaces_the_previous_grant(store: StateStore) -> None:
    store.save("m", "s", GRANT)
    store.save("m", "s", EMPTY_GRANT)
    assert store.load("m", "s") == EMPTY_GRANT


def test_repr_masks_tokens() -> None:
    text = repr(GRANT)
    assert REFRESH not in text
    assert ACCESS not in text


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\0b"])
def test_names_that_are_no_file_names_are_refused(store: StateStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.path(bad, "bill")
    with pytest.raises(ValueError):
        store.path("m", bad)


# --- corrupt and unreadable state ------------------------------------------------------

VALID = json.dumps(valid_doc(), indent=2).encode()

CORRUPT: dict[str, bytes] = {
    "empty": b"",
    "blank": b" \n",
    "truncated": VALID[: len(VALID) // 2],
    "garbage": b"\x00\xffgarbage " + REFRESH.encode(),
    "not-utf8": b'{"refresh_token": "\xff' + REFRESH.encode() + b'"}',
    "list": json.dumps([REFRESH]).encode(),
    "null": b"null",
    "no-version": with_field(version=_DROP),
    "version-2": with_field(version=2),
    "version-string": with_field(version="1"),
    "version-true": with_field(version=True),
    "version-float": with_field(version=1.0),
    "refresh-token-int": with_field(refresh_token=42),
    "refresh-token-empty": with_field(refresh_token=""),
    "fingerprint-null": with_field(fingerprint=None),
    "missing-field": with_field(obtained_at=_DROP),
    "time-string": with_field(first_sign_in_at=REFRESH),
    "time-bool": with_field(obtained_at=True),
    "time-negative": with_field(obtained_at=-1),
    "time-past-year-9999": with_field(access_token_expires_at=1e12),
    "time-null": with_field(obtained_at=None),
    "nan": VALID.replace(b"1800000000.125", b"NaN"),
    "infinity": VALID.replace(b"1800000000.125", b"1e999"),
    "huge-int": VALID.replace(b"1800000000.125", b"9" * 400),
    "too-many-digits": VALID.replace(b"1800000000.125", b"9" * 5000),
    "deep": b"[" * 30_000 + b"]" * 30_000,  # below the size limit, beyond the recursion limit
    "too-large": VALID[:-1] + b" " * (70 * 1024) + b"}",
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_state_is_one_warning_and_none(
    store: StateStore, caplog: Any, content: bytes
) -> None:
    path = store.path("berlin-01", "bill")
    path.parent.mkdir(mode=0o700)
    path.write_bytes(content)
    with caplog.at_level(logging.DEBUG, logger="anybilld.state"):
        assert store.load("berlin-01", "bill") is None
    records = [r for r in caplog.records if r.name == "anybilld.state"]
    assert [r.levelno for r in records] == [logging.WARNING]
    message = records[0].getMessage()
    assert "berlin-01" in message
    assert "bill" in message
    assert str(path) in message
    assert "SECRET" not in caplog.text


def test_valid_file_written_by_hand_loads(store: StateStore) -> None:
    path = store.path("m", "s")
    path.parent.mkdir(mode=0o700)
    path.write_bytes(with_field(extra_field_from_the_future=1))
    assert store.load("m", "s") == GRANT


def test_missing_state_is_none_without_a_warning(store: StateStore, caplog: Any) -> None:
    with caplog.at_level(logging.DEBUG, logger="anybilld.state"):
        assert store.load("nobody", "bill") is None
    assert caplog.records == []


def _unreadable_dir(path: Path) -> None:
    path.mkdir()


def _unreadable_fifo(path: Path) -> None:
    os.mkfifo(path)


def _unreadable_symlink(path: Path) -> None:
    target = path.parent / "elsewhere"
    target.write_bytes(VALID)
    path.symlink_to(target)


@pytest.mark.parametrize("make", [_unreadable_dir, _unreadable_fifo, _unreadable_symlink])
def test_unreadable_state_is_one_warning_and_none(
    store: StateStore, caplog: Any, make: Any
) -> None:
    path = store.path("m", "s")
    path.parent.mkdir(mode=0o700)
    make(path)
    with caplog.at_level(logging.DEBUG, logger="anybilld.state"):
        assert store.load("m", "s") is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "SECRET" not in caplog.text


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StateStore]:
    s = StateStore(tmp_path_factory.mktemp("fuzz") / "state")
    s.prepare()
    s.path("m", "s").parent.mkdir(mode=0o700)
    logging.getLogger("anybilld.state").disabled = True  # thousands of expected warnings
    yield s
    logging.getLogger("anybilld.state").disabled = False


def _load_raw(store: StateStore, raw: bytes) -> StoredGrant | None:
    store.path("m", "s").write_bytes(raw)
    return store.load("m", "s")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=512))
def test_random_bytes_never_raise(fuzz_store: StateStore, raw: bytes) -> None:
    result = _load_raw(fuzz_store, raw)
    assert result is None or isinstance(result, StoredGrant)


# An explicit alphabet: hypothesis' full-unicode text() costs seconds on a cold cache.
_TEXT = st.text(alphabet='aZ09-._~+/= \n"\\\x00é€', max_size=8)
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | _TEXT
# Shallow containers only: the parser's depth is tested above, and deep draws are slow.
JSON_VALUES = (
    _SCALARS | st.lists(_SCALARS, max_size=2) | st.dictionaries(_TEXT, _SCALARS, max_size=2)
)


@settings(max_examples=100, deadline=None)
@given(
    key=st.sampled_from([*valid_doc(), "extra"]),
    value=JSON_VALUES,
    drop=st.booleans(),
)
def test_valid_file_with_one_field_changed_never_raises(
    fuzz_store: StateStore, key: str, value: object, drop: bool
) -> None:
    doc = valid_doc()
    if drop:
        doc.pop(key, None)
    else:
        doc[key] = value
    # allow_nan: hypothesis floats include NaN and inf, which Python's json writes as-is.
    result = _load_raw(fuzz_store, json.dumps(doc, allow_nan=True).encode())
    assert result is None or isinstance(result, StoredGrant)


# --- removal and listing ---------------------------------------------------------------


def test_remove_removes_the_file_and_the_empty_merchant_directory(store: StateStore) -> None:
    store.save("a", "bill", GRANT)
    store.save("a", "store", GRANT)
    store.remove("a", "bill")
    assert store.load("a", "bill") is None
    assert store.path("a", "store").exists()
    store.remove("a", "store")
    assert not store.path("a", "store").parent.exists()
    assert store.directory.is_dir()
    store.remove("a", "store")  # already gone: fine


def test_stored_keys(store: StateStore) -> None:
    for key in [("a", "bill"), ("a", "store"), ("b", "bill")]:
        store.save(*key, GRANT)
    (store.directory / "stray.json").write_bytes(b"")  # not in a merchant directory
    (store.directory / "a" / ".bill.json.0123456789ab.anybilld-tmp").write_bytes(b"")
    (store.directory / "a" / "link.json").symlink_to(store.path("a", "bill"))
    (store.directory / "c").symlink_to(store.directory / "a")
    assert store.stored_keys() == {("a", "bill"), ("a", "store"), ("b", "bill")}


def test_stored_keys_of_a_missing_directory(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "missing").stored_keys() == set()


def test_save_tightens_a_loose_merchant_directory(store: StateStore, tmp_path: Path) -> None:
    # Made by hand, or restored from a backup with the umask's mode.
    loose = tmp_path / "state" / "m"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    store.save("m", "s", GRANT)
    assert mode_of(loose) == 0o700
    assert mode_of(loose / "s.json") == 0o600


def test_digests_name_their_key_and_only_this_key_is_recognised(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.prepare()
    d = store.digest("svc-berlin\0pw")
    assert store.recognises(d)
    assert store.digest("svc-berlin\0pw") == d
    other = StateStore(tmp_path / "elsewhere")
    other.prepare()
    assert not other.recognises(d)
    assert not store.recognises(None)
    assert store.recognises("0" * 64)  # written before digests named their key
