"""load_config: the full schema, every class of mistake with its place, and robustness.

Every error case asserts the exact line and key path of the YAML written here; the
hypothesis tests feed random and mutated documents and accept only a Config or a
ConfigError.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anybilld import _yamlnodes
from anybilld.config import (
    SCOPE_BASE,
    Config,
    IdentitySettings,
    Merchant,
    OutputSpec,
    RefreshSettings,
    ReloadSettings,
    Scope,
    load_config,
)
from anybilld.errors import ConfigError, ConfigProblem
from anybilld.secret import Secret

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "example.yaml"

LOADERS = [pytest.param(yaml.SafeLoader, id="pure")]
if hasattr(yaml, "CSafeLoader"):
    LOADERS.append(pytest.param(yaml.CSafeLoader, id="libyaml"))


@pytest.fixture(params=LOADERS)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test with both the libyaml and the pure-Python composer: marks must agree."""
    monkeypatch.setattr(_yamlnodes, "_LOADER", request.param)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path, environ: Mapping[str, str] | None = None) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return info.value.problems


def show(problems: list[ConfigProblem]) -> str:
    return "\n".join(str(p) for p in problems)


def assert_only(problems: list[ConfigProblem], line: int | None, key_path: str, text: str) -> None:
    assert len(problems) == 1, show(problems)
    (p,) = problems
    assert (p.line, p.key_path, text in p.message) == (line, key_path, True), str(p)
    if line is not None:
        assert f"{p.file}:{line}:" in str(p)
    if key_path:
        assert f" {key_path}: " in str(p)


HEAD = """\
version: 1
identity:
  client_id: abc
"""

# One merchant that is valid on its own; its lines are 4-8 after HEAD.
MERCHANT = """\
merchants:
  - id: m1
    username: u1
    password: pw
    scopes: [bill]
"""


# -- a valid config -------------------------------------------------------------------


def test_full_config_round_trips(tmp_path: Path) -> None:
    write(tmp_path / "etc/secrets/berlin", "hunter2\n")
    write(tmp_path / "creds/hamburg", "s3cret\r\n")
    write(tmp_path / "etc/ca.pem", "-----BEGIN CERTIFICATE-----\n")
    write(tmp_path / "etc/merchants.d/b.yaml", """\
        merchants:
          - id: munich
            username: svc-munich
            password_file: ../secrets/berlin
            scopes: [user]
        """)  # fmt: skip
    write(tmp_path / "etc/merchants.d/a.yaml", """\
        merchants:
          - id: cologne
            username: svc-cologne
            password_env: COLOGNE_PW
            scopes: [category]
        """)  # fmt: skip
    main = write(tmp_path / "etc/config.yaml", """\
        version: 1
        identity:
          token_url: http://127.0.0.1:8080/tenant/oauth2/v2.0/token
          policy: B2C_1A_custom
          client_id: 6f1c-client
          timeout: 1m
          ca_bundle: ca.pem
          max_concurrent_requests: 3
          max_requests_per_second: 2.5
        refresh:
          at: 0.6
          jitter: 0.05
          retry_initial: 2
          retry_max: 1h30m
          blocked_retry: 1d
        outputs:
          - path: "{merchant}/{scope}.json"
          - path: "flat/{merchant}-{scope}.tok"
            format: raw
            mode: "600"
            group: pos
        output_dir: ../out
        state_dir: /srv/state
        on_remove: keep
        listen: "[::1]:0"
        reload:
          watch: poll
          poll_interval: 0.5
        include: ["merchants.d/*.yaml"]
        merchants:
          - id: berlin-01
            username: svc-berlin
            password_file: secrets/berlin
            scopes: [bill, "https://ad.anybill.de/vendor/store"]
          - id: hamburg.02
            username: svc-hamburg
            password_credential: hamburg
            scopes: [https://example.org/api/custom_scope]
            client_id: other-client
            outputs:
              - path: "h/{scope}.env"
                format: env
                mode: "0o640"
                group: 1000
          - id: x_3
            username: "0123"
            password: "no"
            scopes: [customer]
        """)  # fmt: skip
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds"), "COLOGNE_PW": "env-pw"}

    config = load_config(main, environ=environ)

    etc = tmp_path / "etc"
    assert config == Config(
        source=main,
        identity=IdentitySettings(
            client_id="6f1c-client",
            token_url="http://127.0.0.1:8080/tenant/oauth2/v2.0/token",
            policy="B2C_1A_custom",
            timeout=60.0,
            ca_bundle=str(etc / "ca.pem"),
            max_concurrent_requests=3,
            max_requests_per_second=2.5,
        ),
        refresh=RefreshSettings(
            at=0.6, jitter=0.05, retry_initial=2.0, retry_max=5400.0, blocked_retry=86400.0
        ),
        outputs=(
            OutputSpec(path="{merchant}/{scope}.json", format="json", mode=0o640, group=None),
            OutputSpec(path="flat/{merchant}-{scope}.tok", format="raw", mode=0o600, group="pos"),
        ),
        output_dir=tmp_path / "out",
        state_dir=Path("/srv/state"),
        on_remove="keep",
        listen_host="::1",
        listen_port=0,
        reload=ReloadSettings(watch="poll", poll_interval=0.5),
        include=("merchants.d/*.yaml",),
        merchants=(
            Merchant(
                id="berlin-01",
                username="svc-berlin",
                password=Secret("hunter2"),
                scopes=(
                    Scope(name="bill", uri=SCOPE_BASE + "bill"),
                    Scope(name="store", uri=SCOPE_BASE + "store"),
                ),
            ),
            Merchant(
                id="hamburg.02",
                username="svc-hamburg",
                password=Secret("s3cret"),
                scopes=(Scope(name="custom_scope", uri="https://example.org/api/custom_scope"),),
                outputs=(OutputSpec(path="h/{scope}.env", format="env", mode=0o640, group=1000),),
                client_id="other-client",
            ),
            Merchant(
                id="x_3",
                username="0123",
                password=Secret("no"),
                scopes=(Scope(name="customer", uri=SCOPE_BASE + "customer"),),
            ),
            # Included files follow the main file's merchants, in sorted order.
            Merchant(
                id="cologne",
                username="svc-cologne",
                password=Secret("env-pw"),
                scopes=(Scope(name="category", uri=SCOPE_BASE + "category"),),
            ),
            Merchant(
                id="munich",
                username="svc-munich",
                password=Secret("hunter2"),
                scopes=(Scope(name="user", uri=SCOPE_BASE + "user"),),
            ),
        ),
    )
    assert set(config.files) == {
        main,
        etc / "secrets/berlin",
        tmp_path / "creds/hamburg",
        etc / "merchants.d/a.yaml",
        etc / "merchants.d/b.yaml",
    }
    assert all(f.is_absolute() for f in config.files)
    hamburg = [t for t in config.token_sets() if t.merchant == "hamburg.02"]
    assert [o.path for t in hamburg for o in t.outputs] == [tmp_path / "out/h/custom_scope.env"]
    assert hamburg[0].client_id == "other-client"


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "c.yaml", HEAD + MERCHANT), environ={})
    assert config.identity == IdentitySettings(client_id="abc")
    assert config.identity.token_url.startswith("https://adanybill.b2clogin.com/")
    assert (config.refresh, config.reload) == (RefreshSettings(), ReloadSettings())
    assert config.outputs == (OutputSpec(path="{merchant}/{scope}.json", mode=0o640),)
    assert config.output_dir == Path("/var/lib/anybilld/tokens")
    assert config.state_dir == Path("/var/lib/anybilld/state")
    assert (config.on_remove, config.listen_host, config.listen_port) == (
        "delete",
        "127.0.0.1",
        9464,
    )
    assert config.include == ()
    assert config.files == (tmp_path / "c.yaml",)
    (spec,) = config.token_sets()
    assert spec.scope_param == SCOPE_BASE + "bill offline_access"
    assert spec.outputs[0].path == Path("/var/lib/anybilld/tokens/m1/bill.json")


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", HEAD + "refresh:\nreload:\ninclude:\nmerchants:\n")
    config = load_config(path, environ={})
    assert (config.refresh, config.reload, config.merchants) == (
        RefreshSettings(),
        ReloadSettings(),
        (),
    )


def test_anchors_and_aliases_share_values(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", HEAD + textwrap.dedent("""\
        merchants:
          - id: a
            username: u
            password: pw
            scopes: &scopes [bill, store]
            outputs: &raw
              - {path: "raw/{merchant}-{scope}", format: raw}
          - id: b
            username: u
            password: pw
            scopes: *scopes
            outputs: *raw
        """))  # fmt: skip
    config = load_config(path, environ={})
    assert config.merchants[1].scopes == config.merchants[0].scopes
    assert len({o.path for t in config.token_sets() for o in t.outputs}) == 4


def test_a_reloaded_config_reuses_the_running_entries_it_equals(tmp_path: Path) -> None:
    entries = "".join(
        f"  - {{id: {i}, username: u{i}, password: pw{i}, scopes: [bill]}}\n" for i in "abc"
    )
    path = write(tmp_path / "c.yaml", HEAD + "merchants:\n" + entries)
    running = load_config(path, environ={})
    write(path, HEAD + "merchants:\n" + entries.replace("pwb", "pw-new"))
    loaded = load_config(path, environ={})
    config = loaded.reusing(running)
    assert config == loaded and config.files == loaded.files
    a, b, c = config.merchants
    assert a is running.merchants[0] and c is running.merchants[2]
    assert b is loaded.merchants[1] and b.password == Secret("pw-new")


def test_example_config_is_valid(tmp_path: Path) -> None:
    main = tmp_path / "config.yaml"
    shutil.copy(EXAMPLE, main)
    write(tmp_path / "secrets/berlin-01", "pw\n")
    write(tmp_path / "creds/hamburg-02", "pw\n")
    (tmp_path / "merchants.d").mkdir()  # tmpfiles.d/anybilld.conf creates it on a server
    config = load_config(main, environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    assert [m.id for m in config.merchants] == ["berlin-01", "hamburg-02"]
    # Every key of the schema appears in the example, so it documents all of them.
    text = EXAMPLE.read_text()
    for key in ("ca_bundle", "blocked_retry", "poll_interval", "password_env", "group"):
        assert f"{key}:" in text


# -- one mistake, one problem, at the right place ------------------------------------

# (id, document, line, key path, part of the message); one case per line or two, so
# the table stays readable.
# fmt: off
ONE_PROBLEM = [
    # the file as a whole
    ("top-list", "- a\n- b\n", 1, "", "expected a mapping, got a list"),
    ("top-scalar", "hello\n", 1, "", "expected a mapping, got a string"),
    ("empty", "", None, "", "the file is empty"),
    ("only-comments", "# nothing\n\n", None, "", "the file is empty"),
    ("two-documents", HEAD + "---\na: 1\n", 4, "", "another document"),
    ("syntax", HEAD + "refresh: {at: 0.5\n", 5, "", "invalid YAML"),
    ("tab-indent", HEAD + "refresh:\n\tat: 0.5\n", 5, "", "invalid YAML"),
    ("bad-indent", "version: 1\nidentity:\n  client_id: a\n   policy: b\n", 4, "", "invalid"),
    ("control-char", HEAD + "x: \x01\n", 4, "", "U+0001"),
    ("undefined-alias", HEAD + "refresh: *nothing\n", 4, "", "alias"),
    # top level
    ("unknown-top", HEAD + "merchant: []\n", 4, "merchant", "did you mean 'merchants'?"),
    ("unknown-no-hint", HEAD + "zzz: 1\n", 4, "zzz", "expected one of: version"),
    ("duplicate-top", HEAD + "version: 1\n", 4, "version", "duplicate key 'version'"),
    ("merge-key", HEAD + "refresh:\n  <<: {at: 0.4}\n", 5, "refresh.<<", "merge keys"),
    ("non-scalar-key", HEAD + "? [a]\n: 1\n", 4, "", "a key must be a plain name"),
    ("version-missing", "identity: {client_id: a}\n", 1, "version", "missing required"),
    ("version-2", "version: 2\nidentity: {client_id: a}\n", 1, "version", "version 2"),
    ("version-str", "version: '1'\nidentity: {client_id: a}\n", 1, "version", "integer 1"),
    ("identity-missing", "version: 1\n", 1, "identity", "missing required key 'identity'"),
    ("identity-list", "version: 1\nidentity: []\n", 2, "identity", "expected a mapping"),
    ("client-id-missing", "version: 1\nidentity:\n  policy: p\n", 3, "identity.client_id",
     "missing required key 'client_id'"),
    ("client-id-empty", "version: 1\nidentity:\n", 2, "identity.client_id", "missing"),
    ("client-id-int", "version: 1\nidentity:\n  client_id: 0x1F\n", 3, "identity.client_id",
     'YAML reads 0x1F as an integer; quote it: "0x1F"'),
    ("client-id-space", "version: 1\nidentity:\n  client_id: 'a b'\n", 3, "identity.client_id",
     "whitespace"),
    ("unknown-identity", HEAD + "  clent_id: x\n", 4, "identity.clent_id",
     "unknown key 'clent_id' (did you mean 'client_id'?)"),
    ("duplicate-client-id", HEAD + "  client_id: b\n", 4, "identity.client_id",
     "duplicate key 'client_id' (first at line 3)"),
    # identity values
    ("token-url-ftp", HEAD + "  token_url: ftp://x/token\n", 4, "identity.token_url",
     "http(s) URL"),
    ("token-url-nohost", HEAD + "  token_url: https:///token\n", 4, "identity.token_url", "URL"),
    ("policy", HEAD + "  policy: 'a b'\n", 4, "identity.policy", "policy name"),
    ("timeout-zero", HEAD + "  timeout: 0\n", 4, "identity.timeout", "longer than 0s"),
    ("timeout-negative", HEAD + "  timeout: -5s\n", 4, "identity.timeout", "duration"),
    ("timeout-unit", HEAD + "  timeout: 5 minutes\n", 4, "identity.timeout", "like 90s"),
    ("timeout-bool", HEAD + "  timeout: yes\n", 4, "identity.timeout", "got a boolean"),
    ("timeout-inf", HEAD + "  timeout: .inf\n", 4, "identity.timeout", "finite"),
    ("ca-missing", HEAD + "  ca_bundle: nothere.pem\n", 4, "identity.ca_bundle",
     "cannot read ca_bundle"),
    ("ca-dir", HEAD + "  ca_bundle: /\n", 4, "identity.ca_bundle", "not a regular file"),
    ("concurrency-zero", HEAD + "  max_concurrent_requests: 0\n", 4,
     "identity.max_concurrent_requests", "at least 1"),
    ("concurrency-float", HEAD + "  max_concurrent_requests: 2.5\n", 4,
     "identity.max_concurrent_requests", "expected an integer"),
    ("rate-zero", HEAD + "  max_requests_per_second: 0\n", 4,
     "identity.max_requests_per_second", "greater than 0"),
    ("rate-string", HEAD + "  max_requests_per_second: fast\n", 4,
     "identity.max_requests_per_second", "expected a number, got a string"),
    # refresh
    ("at-one", HEAD + "refresh:\n  at: 1\n", 5, "refresh.at", "between 0 and 1"),
    ("at-nan", HEAD + "refresh:\n  at: .nan\n", 5, "refresh.at", "finite"),
    ("jitter-negative", HEAD + "refresh:\n  jitter: -0.1\n", 5, "refresh.jitter", "negative"),
    ("jitter-too-wide", HEAD + "refresh:\n  at: 0.5\n  jitter: 0.5\n", 6, "refresh.jitter",
     "at 0.5 ± jitter 0.5 must stay between 0 and 1"),
    ("at-plus-jitter", HEAD + "refresh:\n  at: 0.95\n", 5, "refresh.at", "± jitter 0.1"),
    ("retry-order", HEAD + "refresh:\n  retry_initial: 10m\n  retry_max: 1m\n", 6,
     "refresh.retry_max", "retry_initial (600s) must not exceed retry_max (60s)"),
    ("blocked-retry", HEAD + "refresh:\n  blocked_retry: 1w\n", 5, "refresh.blocked_retry",
     "duration"),
    ("refresh-list", HEAD + "refresh: [1]\n", 4, "refresh", "expected a mapping"),
    # outputs
    ("outputs-empty", HEAD + "outputs: []\n", 4, "outputs", "at least one output"),
    ("outputs-null", HEAD + "outputs:\n", 4, "outputs", "use [] for none"),
    ("outputs-map", HEAD + "outputs: {path: x}\n", 4, "outputs", "expected a list"),
    ("output-no-path", HEAD + "outputs:\n  - format: raw\n", 5, "outputs[0].path", "missing"),
    ("output-absolute", HEAD + "outputs:\n  - path: /tmp/{merchant}\n", 5, "outputs[0].path",
     "relative to output_dir"),
    ("output-dotdot", HEAD + "outputs:\n  - path: a/../../{merchant}\n", 5, "outputs[0].path",
     "'..' segment"),
    ("output-dir", HEAD + "outputs:\n  - path: '{merchant}/'\n", 5, "outputs[0].path",
     "names a directory"),
    ("output-placeholder", HEAD + "outputs:\n  - path: '{merchnt}/{scope}'\n", 5,
     "outputs[0].path", "unknown placeholder {merchnt} (did you mean {merchant}?)"),
    ("output-brace", HEAD + "outputs:\n  - path: '{merchant}/{scope'\n", 5, "outputs[0].path",
     "stray brace"),
    ("output-format", HEAD + "outputs:\n  - path: x\n    format: jsn\n", 6,
     "outputs[0].format", "'jsn' is not one of json, raw, env, header (did you mean 'json'?)"),
    ("output-mode-int", HEAD + "outputs:\n  - path: x\n    mode: 0640\n", 6, "outputs[0].mode",
     'YAML reads 0640 as an integer; quote it: mode: "0640"'),
    ("output-mode-decimal", HEAD + "outputs:\n  - path: x\n    mode: 600\n", 6,
     "outputs[0].mode", 'quote it: mode: "0600"'),
    ("output-mode-setuid", HEAD + "outputs:\n  - path: x\n    mode: '4755'\n", 6,
     "outputs[0].mode", "above 0777"),
    ("output-mode-digit", HEAD + "outputs:\n  - path: x\n    mode: '0648'\n", 6,
     "outputs[0].mode", "octal"),
    ("output-group-bool", HEAD + "outputs:\n  - path: x\n    group: yes\n", 6,
     "outputs[0].group", "quote it"),
    ("output-group-negative", HEAD + "outputs:\n  - path: x\n    group: -1\n", 6,
     "outputs[0].group", "group id"),
    ("output-unknown-key", HEAD + "outputs:\n  - path: x\n    owner: me\n", 6,
     "outputs[0].owner", "unknown key 'owner'"),
    # other top-level settings
    ("output-dir-int", HEAD + "output_dir: 5\n", 4, "output_dir", "quote it"),
    ("same-dirs", HEAD + "output_dir: /srv/a\nstate_dir: /srv/a/state\n", 5, "state_dir",
     "separate directories"),
    ("on-remove", HEAD + "on_remove: no\n", 4, "on_remove", "one of delete, keep"),
    ("on-remove-typo", HEAD + "on_remove: kep\n", 4, "on_remove", "did you mean 'keep'?"),
    ("listen-int", HEAD + "listen: 9464\n", 4, "listen", '"host:port"'),
    ("listen-no-port", HEAD + "listen: localhost\n", 4, "listen", "host:port"),
    ("listen-port", HEAD + "listen: localhost:65536\n", 4, "listen", "0 to 65535"),
    ("listen-v6", HEAD + "listen: '::1:9464'\n", 4, "listen", "needs brackets"),
    ("listen-bad-v6", HEAD + "listen: '[::g]:9464'\n", 4, "listen", "not an IPv6 address"),
    ("listen-bad-v4", HEAD + "listen: 10.0.0.300:1\n", 4, "listen", "not an IPv4 address"),
    ("watch", HEAD + "reload:\n  watch: fanotify\n", 5, "reload.watch", "one of auto"),
    ("poll", HEAD + "reload:\n  poll_interval: 0s\n", 5, "reload.poll_interval", "longer"),
    ("include-string", HEAD + "include: a/*.yaml\n", 4, "include", "expected a list"),
    ("include-missing", HEAD + "include: [nothere.yaml]\n", 4, "include[0]", "no such file"),
    ("include-dir", HEAD + "include: [/]\n", 4, "include[0]", "is a directory"),
    ("include-self", HEAD + "include: [c.yaml]\n", 4, "include[0]", "include itself"),
    # merchants
    ("merchants-map", HEAD + "merchants: {id: a}\n", 4, "merchants", "expected a list"),
    ("merchant-scalar", HEAD + "merchants: [a]\n", 4, "merchants[0]", "expected a mapping"),
    ("merchant-unknown", HEAD + MERCHANT + "    scope: [x]\n", 9, "merchants[0].scope",
     "did you mean 'scopes'?"),
    ("merchant-dup-key", HEAD + MERCHANT + "    username: u2\n", 9, "merchants[0].username",
     "duplicate key 'username' (first at line 6)"),
    ("id-missing", HEAD + MERCHANT.replace("- id: m1\n    ", "- "), 5, "merchants[0].id",
     "missing required key 'id'"),
    ("id-bool", HEAD + MERCHANT.replace("m1", "no"), 5, "merchants[0].id",
     'expected a string but YAML reads no as a boolean; quote it: "no"'),
    ("id-octal", HEAD + MERCHANT.replace("m1", "0123"), 5, "merchants[0].id",
     'YAML reads 0123 as an integer; quote it: "0123"'),
    ("id-yaml12", HEAD + MERCHANT.replace("m1", "0789"), 5, "merchants[0].id",
     'YAML 1.2 tools read 0789 as a number; quote it: "0789"'),
    ("id-empty", HEAD + MERCHANT.replace("m1", ""), 5, "merchants[0].id", "empty value"),
    ("id-slash", HEAD + MERCHANT.replace("m1", "a/b"), 5, "merchants[0].id", "only letters"),
    ("id-dotdot", HEAD + MERCHANT.replace("m1", "'..'"), 5, "merchants[0].id", "'..'"),
    ("id-list", HEAD + MERCHANT.replace("m1", "[a]"), 5, "merchants[0].id", "got a list"),
    ("id-tag", HEAD + MERCHANT.replace("m1", "!secret m1"), 5, "merchants[0].id",
     "unsupported tag !secret"),
    ("username-float", HEAD + MERCHANT.replace("u1", "1e3"), 6, "merchants[0].username",
     'YAML 1.2 tools read 1e3 as a number; quote it: "1e3"'),
    ("username-float11", HEAD + MERCHANT.replace("u1", "1.5"), 6, "merchants[0].username",
     'YAML reads 1.5 as a number; quote it: "1.5"'),
    ("username-null", HEAD + MERCHANT.replace("u1", "~"), 6, "merchants[0].username",
     "empty value"),
    ("username-date", HEAD + MERCHANT.replace("u1", "2024-01-02"), 6, "merchants[0].username",
     "as a date"),
    ("username-quoted-empty", HEAD + MERCHANT.replace("u1", "''"), 6, "merchants[0].username",
     "must not be empty"),
    ("client-id-override", HEAD + MERCHANT + "    client_id: 12\n", 9,
     "merchants[0].client_id", "quote it"),
    ("merchant-outputs", HEAD + MERCHANT + "    outputs:\n      - path: /x\n", 10,
     "merchants[0].outputs[0].path", "relative"),
    # scopes
    ("scopes-missing", HEAD + MERCHANT.replace("    scopes: [bill]\n", ""), 5,
     "merchants[0].scopes", "missing required key 'scopes'"),
    ("scopes-empty", HEAD + MERCHANT.replace("[bill]", "[]"), 8, "merchants[0].scopes",
     "at least one scope"),
    ("scopes-string", HEAD + MERCHANT.replace("[bill]", "bill"), 8, "merchants[0].scopes",
     "expected a list"),
    ("scope-typo", HEAD + MERCHANT.replace("[bill]", "[bill, stor]"), 8,
     "merchants[0].scopes[1]", "unknown scope 'stor' (did you mean 'store'?)"),
    ("scope-case", HEAD + MERCHANT.replace("[bill]", "[Bill]"), 8, "merchants[0].scopes[0]",
     "did you mean 'bill'?"),
    ("scope-offline", HEAD + MERCHANT.replace("[bill]", "[bill, offline_access]"), 8,
     "merchants[0].scopes[1]", "always requested"),
    ("scope-duplicate", HEAD + MERCHANT.replace("[bill]", "[bill, bill]"), 8,
     "merchants[0].scopes[1]", "duplicate scope 'bill'"),
    ("scope-same-name", HEAD + MERCHANT.replace("[bill]", "[bill, 'https://x.org/a/bill']"),
     8, "merchants[0].scopes[1]", "both map to the scope name 'bill'"),
    ("scope-uri-slash", HEAD + MERCHANT.replace("[bill]", "['https://x.org/a/']"), 8,
     "merchants[0].scopes[0]", "last path segment"),
    ("scope-uri-query", HEAD + MERCHANT.replace("[bill]", "['https://x.org/a?b=c']"), 8,
     "merchants[0].scopes[0]", "scope URI"),
    ("scope-space", HEAD + MERCHANT.replace("[bill]", "['https://x.org/a b']"), 8,
     "merchants[0].scopes[0]", "whitespace"),
    # secrets
    ("no-secret", HEAD + MERCHANT.replace("    password: pw\n", ""), 5, "merchants[0]",
     "needs one of password_file, password_env, password_credential, password"),
    ("two-secrets", HEAD + MERCHANT + "    password_env: PW\n", 9, "merchants[0].password_env",
     "exactly one of"),
    ("password-int", HEAD + MERCHANT.replace("pw", "0123"), 7, "merchants[0].password",
     "expected a string but YAML reads this value as an integer; quote it"),
    ("password-empty", HEAD + MERCHANT.replace("pw", '""'), 7, "merchants[0].password",
     "must not be empty"),
    ("env-unset", HEAD + MERCHANT.replace("password: pw", "password_env: NOPE"), 7,
     "merchants[0].password_env", "environment variable NOPE is not set"),
    ("env-empty", HEAD + MERCHANT.replace("password: pw", "password_env: EMPTY"), 7,
     "merchants[0].password_env", "environment variable EMPTY is empty"),
    ("env-name", HEAD + MERCHANT.replace("password: pw", "password_env: 'A-B'"), 7,
     "merchants[0].password_env", "not an environment variable name"),
    ("file-missing", HEAD + MERCHANT.replace("password: pw", "password_file: nothere"), 7,
     "merchants[0].password_file", "nothere: No such file or directory"),
    ("file-dir", HEAD + MERCHANT.replace("password: pw", "password_file: ."), 7,
     "merchants[0].password_file", "not a regular file"),
    ("credential-unset", HEAD + MERCHANT.replace("password: pw", "password_credential: c"), 7,
     "merchants[0].password_credential", "needs $CREDENTIALS_DIRECTORY"),
    ("credential-path", HEAD + MERCHANT.replace("password: pw", "password_credential: a/b"), 7,
     "merchants[0].password_credential", "not a credential name"),
    ("scope-http", HEAD + MERCHANT.replace("[bill]", "['http://x.org/a/bill']"), 8,
     "merchants[0].scopes[0]", "full https:// URI"),
    ("listen-v6-no-port", HEAD + "listen: '[::1]'\n", 4, "listen", "host:port"),
]
# fmt: on


@pytest.mark.usefixtures("loader")
@pytest.mark.parametrize(
    ("document", "line", "key_path", "text"),
    [pytest.param(*case[1:], id=case[0]) for case in ONE_PROBLEM],
)
def test_one_mistake_gives_one_located_problem(
    tmp_path: Path, document: str, line: int | None, key_path: str, text: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(document)
    problems = problems_of(path, {"EMPTY": ""})
    assert_only(problems, line, key_path, text)
    assert problems[0].file == str(path)


@pytest.mark.parametrize(
    ("content", "line", "column"),
    [
        pytest.param(b"version: 1\nid: a\xff\n", 2, 6, id="latin1"),
        pytest.param(b"\xfe\xff\x00v", 1, 1, id="utf16"),
    ],
)
def test_undecodable_file(tmp_path: Path, content: bytes, line: int, column: int) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    (p,) = problems_of(path)
    assert (p.line, p.column, p.key_path) == (line, column, "")
    assert "not UTF-8 text (byte 0x" in p.message


def test_unreadable_main_file(tmp_path: Path) -> None:
    assert_only(problems_of(tmp_path / "missing.yaml"), None, "", "No such file or directory")
    assert_only(problems_of(tmp_path), None, "", "not a regular file")
    os.mkfifo(tmp_path / "fifo")  # must not hang waiting for a writer
    assert_only(problems_of(tmp_path / "fifo"), None, "", "not a regular file")


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", """\
        version: 1
        identity:
          client_id: abc
          timeout: soon
        merchants:
          - id: m1
            username: u1
            password: pw
            scopes: [bil]
          - id: m2
            username: yes
            password: pw
            scopes: [store]
        """)  # fmt: skip
    problems = problems_of(path)
    assert [(p.line, p.key_path) for p in problems] == [
        (4, "identity.timeout"),
        (9, "merchants[0].scopes[0]"),
        (11, "merchants[1].username"),
    ]
    assert str(ConfigError(problems)).count("\n") == 2


def test_duplicate_keys_at_every_level(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", """\
        version: 1
        identity:
          client_id: abc
          client_id: abd
        merchants:
          - id: m1
            username: u1
            password: pw
            scopes: [bill]
            id: m2
        identity: {}
        """)  # fmt: skip
    problems = problems_of(path)
    assert [(p.line, p.column, p.key_path) for p in problems] == [
        (4, 3, "identity.client_id"),
        (10, 5, "merchants[0].id"),
        (11, 1, "identity"),
    ]
    assert all("duplicate key" in p.message for p in problems)


@pytest.mark.usefixtures("loader")
@pytest.mark.parametrize(
    ("key", "raw", "reads_as"),
    [
        ("id", "no", "as a boolean"),
        ("id", "off", "as a boolean"),
        ("id", "0123", "as an integer"),
        ("id", "1_000", "as an integer"),
        ("username", "12:30", "as an integer"),  # sexagesimal: 750
        ("username", "1e3", "YAML 1.2 tools read 1e3 as a number"),
        ("username", "1.0e+3", "as a number"),
        ("username", "0o17", "YAML 1.2 tools read 0o17 as a number"),
        ("username", "null", "YAML reads null as null"),
        ("username", "~", "got an empty value"),
        ("password", "0123", "reads this value as an integer"),
        ("password", "true", "reads this value as a boolean"),
        ("password", "1e3", "YAML 1.2 tools read this value as a number"),
    ],
)
def test_yaml_1_1_surprises_must_be_quoted(
    tmp_path: Path, key: str, raw: str, reads_as: str
) -> None:
    def document(value: str) -> str:
        placeholder = {"id": "m1", "username": "u1", "password": "pw"}[key]
        return HEAD + MERCHANT.replace(f": {placeholder}\n", f": {value}\n")

    path = write(tmp_path / "c.yaml", document(raw))
    (p,) = problems_of(path)
    assert (p.line, p.key_path) == (
        {"id": 5, "username": 6, "password": 7}[key],
        f"merchants[0].{key}",
    )
    assert reads_as in p.message
    if key != "password" and raw != "~":
        assert f'quote it: "{raw}"' in p.message

    write(tmp_path / "c.yaml", document(f'"{raw}"'))  # quoted, it is the string as written
    merchant = load_config(path, environ={}).merchants[0]
    loaded = {"id": merchant.id, "username": merchant.username}
    assert loaded.get(key, merchant.password.reveal()) == raw


# -- include --------------------------------------------------------------------------


def include_setup(tmp_path: Path, pattern: str = "merchants.d/*.yaml") -> Path:
    return write(tmp_path / "c.yaml", HEAD + f"include: [{pattern!r}]\n" + MERCHANT)


def test_include_glob_reads_matches_in_sorted_order(tmp_path: Path) -> None:
    main = include_setup(tmp_path)
    for name in ("20-b.yaml", "10-a.yaml", "notes.txt", ".10-a.yaml.swp"):
        write(tmp_path / "merchants.d" / name, f"""\
            merchants:
              - id: {name[:4]}
                username: u
                password_file: ../pw/{name[:4]}
                scopes: [bill]
            """)  # fmt: skip
        write(tmp_path / "pw" / name[:4], "x\n")
    (tmp_path / "merchants.d/sub.yaml").mkdir()  # a directory matching the glob is skipped
    config = load_config(main, environ={})
    assert [m.id for m in config.merchants] == ["m1", "10-a", "20-b"]
    assert tmp_path / "merchants.d/10-a.yaml" in config.files
    assert tmp_path / "pw/20-b" in config.files


def test_include_glob_matching_nothing_is_fine(tmp_path: Path) -> None:
    (tmp_path / "merchants.d").mkdir()
    config = load_config(include_setup(tmp_path), environ={})
    assert [m.id for m in config.merchants] == ["m1"]


@pytest.mark.parametrize("pattern", ["merchants.d/*.yaml", "stores/merchants.d/**/*.yaml"])
def test_include_glob_of_a_missing_directory_is_an_error(tmp_path: Path, pattern: str) -> None:
    """Not "no merchants": a directory swapped by `mv`, read in the gap, would remove
    every merchant in it."""
    main = include_setup(tmp_path, pattern)
    missing = tmp_path / pattern.split("/*")[0]
    assert_only(problems_of(main), 4, "include[0]", f"no such directory: {missing}")


def test_include_absolute_pattern(tmp_path: Path) -> None:
    write(tmp_path / "elsewhere/x.yaml", "merchants: []\n")
    main = include_setup(tmp_path, str(tmp_path / "elsewhere/*.yaml"))
    assert tmp_path / "elsewhere/x.yaml" in load_config(main, environ={}).files


def test_error_in_include_names_the_included_file(tmp_path: Path) -> None:
    main = include_setup(tmp_path)
    inc = write(tmp_path / "merchants.d/a.yaml", """\
        merchants:
          - id: m2
            username: u
            password_file: nothere
            scopes: [bill]
        include: ["more/*.yaml"]
        identity: {client_id: x}
        """)  # fmt: skip
    problems = problems_of(main)
    assert [(p.file, p.line, p.key_path) for p in problems] == [
        (str(inc), 4, "merchants[0].password_file"),
        (str(inc), 6, "include"),
        (str(inc), 7, "identity"),
    ]
    # A relative password_file is relative to the file that names it.
    assert str(tmp_path / "merchants.d/nothere") in problems[0].message
    assert "cannot include further" in problems[1].message
    assert "belongs in the main config file" in problems[2].message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", [(None, "", "the file is empty")]),
        ("- a\n", [(1, "", "expected a mapping, got a list")]),
        ("merchants: [\n", [(2, "", "invalid YAML")]),
        ("merchants: {}\n", [(1, "merchants", "expected a list, got a mapping")]),
        (
            "other: 1\n",
            [
                (1, "other", "unknown key 'other'; expected one of: merchants"),
                (1, "merchants", "missing required key 'merchants'"),
            ],
        ),
    ],
)
def test_broken_include_file(
    tmp_path: Path, content: str, expected: list[tuple[int | None, str, str]]
) -> None:
    main = include_setup(tmp_path)
    inc = write(tmp_path / "merchants.d/a.yaml", content)
    problems = problems_of(main)
    assert [(p.line, p.key_path, p.message) for p in problems] == [
        (line, key_path, ANY_CONTAINING(text)) for line, key_path, text in expected
    ], show(problems)
    assert {p.file for p in problems} == {str(inc)}


class ANY_CONTAINING(str):  # named like mock.ANY, which it resembles
    """Equal to any string that contains it."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and str.__contains__(other, self)

    __hash__ = str.__hash__


def test_missing_literal_include(tmp_path: Path) -> None:
    main = include_setup(tmp_path, "merchants.d/a.yaml")
    assert_only(problems_of(main), 4, "include[0]", f"no such file: {tmp_path}/merchants.d")


def test_duplicate_id_across_files_names_both_places(tmp_path: Path) -> None:
    main = include_setup(tmp_path)
    inc = write(tmp_path / "merchants.d/a.yaml", """\
        # another m1
        merchants:
          - id: m1
            username: u
            password: pw
            scopes: [bill]
        """)  # fmt: skip
    (p,) = problems_of(main)
    assert (p.file, p.line, p.key_path) == (str(inc), 3, "merchants[0].id")
    assert f"duplicate merchant id 'm1'; first defined at {main}:6 (merchants[0].id)" in str(p)


# -- secrets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "secret"),
    [
        (b"pw\n", "pw"),
        (b"pw\r\n", "pw"),
        (b"pw\n\n", "pw\n"),
        (b"pw\r\n\r\n", "pw\r\n"),
        (b"pw\r", "pw\r"),
        (b"pw", "pw"),
        (b" pw \t\n", " pw \t"),
        ("pässwörd\n".encode(), "pässwörd"),
    ],
)
@pytest.mark.parametrize("source", ["password_file", "password_credential"])
def test_secret_file_loses_one_trailing_newline(
    tmp_path: Path, source: str, content: bytes, secret: str
) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds/m1").write_bytes(content)
    main = write(tmp_path / "c.yaml", HEAD + MERCHANT.replace("password: pw", f"{source}: m1"))
    main.with_name("m1").write_bytes(content)
    config = load_config(main, environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    assert config.merchants[0].password.reveal() == secret
    expected = tmp_path / ("m1" if source == "password_file" else "creds/m1")
    assert config.files == (main, expected)


def test_password_env_is_taken_verbatim(tmp_path: Path) -> None:
    main = write(tmp_path / "c.yaml", HEAD + MERCHANT.replace("password: pw", "password_env: PW"))
    config = load_config(main, environ={"PW": " pw\n"})
    assert config.merchants[0].password == Secret(" pw\n")


def test_environ_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main = write(tmp_path / "c.yaml", HEAD + MERCHANT.replace("password: pw", "password_env: PW"))
    monkeypatch.setenv("PW", "from-env")
    assert load_config(main).merchants[0].password == Secret("from-env")


@pytest.mark.parametrize(
    ("content", "text"),
    [
        pytest.param(b"", "s is empty", id="empty"),
        pytest.param(b"\n", "s is empty", id="newline"),
        pytest.param(b"\r\n", "s is empty", id="crlf"),
        pytest.param(b"hunter2\xff\n", "s is not UTF-8 text", id="latin1"),
        pytest.param(b"hunter2" * 20000, "s: larger than 65536 bytes", id="huge"),
    ],
)
def test_bad_secret_file(tmp_path: Path, content: bytes, text: str) -> None:
    main = write(tmp_path / "c.yaml", HEAD + MERCHANT.replace("password: pw", "password_file: s"))
    (tmp_path / "s").write_bytes(content)
    problems = problems_of(main)
    assert_only(problems, 7, "merchants[0].password_file", f"password_file {tmp_path}/{text}")
    assert "hunter2" not in str(ConfigError(problems))


def test_lone_surrogate_escape_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # libyaml refuses the escape itself; PyYAML's own composer lets it through, and such a
    # string would break the first .encode() in the identity client.
    monkeypatch.setattr(_yamlnodes, "_LOADER", yaml.SafeLoader)
    path = write(tmp_path / "c.yaml", HEAD + MERCHANT.replace("u1", '"\\ud800"'))
    assert_only(problems_of(path), 6, "merchants[0].username", "lone surrogate")


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("password: 0123456", id="octal"),
        pytest.param("password: 1234567.5", id="float"),
        pytest.param("password: 1e3456", id="yaml12-float"),
        pytest.param("password: yes", id="bool"),
        pytest.param("password: !vault 'hunter2'", id="tag"),
        pytest.param("password: [hunter2, x]", id="list"),
        pytest.param("password: {hunter2: x}", id="mapping"),
        pytest.param("password: 'hunter2'\n    password: 'hunter2'", id="duplicate"),
        pytest.param("password: 'hunter2'\n    password_env: HUNTER2", id="two-sources"),
        pytest.param('password: "\\ud800hunter2"', id="surrogate"),
        pytest.param("password: *hunter2", id="alias"),
        pytest.param("password: !hunter2!x y", id="tag-handle"),
        pytest.param("password: &hunter2 x\n    username: &hunter2 y", id="anchor"),
        pytest.param("password: 'hunter2\n", id="unterminated"),
    ],
)
@pytest.mark.usefixtures("loader")
def test_a_bad_secret_never_shows_in_the_error(tmp_path: Path, line: str) -> None:
    main = write(tmp_path / "c.yaml", HEAD + MERCHANT.replace("password: pw", line))
    # The file's own path is named in every problem; its digits are not the secret's.
    message = str(ConfigError(problems_of(main))).replace(str(tmp_path), "<dir>")
    for fragment in ("hunter2", "0123456", "83", "1234567", "3456", "yes", "true"):
        assert fragment not in message


def test_secret_is_masked_in_config_repr(tmp_path: Path) -> None:
    main = write(tmp_path / "c.yaml", HEAD + MERCHANT.replace("pw", "hunter2"))
    config = load_config(main, environ={})
    assert "hunter2" not in repr(config) + repr(config.token_sets())


# -- output paths ---------------------------------------------------------------------


def test_two_token_sets_writing_one_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", HEAD + textwrap.dedent("""\
        outputs:
          - path: "{scope}.json"
        output_dir: /out
        merchants:
          - id: a
            username: u
            password: pw
            scopes: [bill, store]
          - id: b
            username: u
            password: pw
            scopes: [bill]
        """))  # fmt: skip
    (p,) = problems_of(path)
    assert (p.line, p.key_path) == (5, "outputs[0].path")
    assert "2 token sets write the same file /out/bill.json" in p.message
    assert f"a/bill (merchant at {path}:8, outputs[0].path at {path}:5)" in p.message
    assert f"b/bill (merchant at {path}:12, outputs[0].path at {path}:5)" in p.message


def test_override_colliding_with_default_outputs(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", HEAD + textwrap.dedent("""\
        output_dir: /out
        merchants:
          - id: a
            username: u
            password: pw
            scopes: [bill]
          - id: b
            username: u
            password: pw
            scopes: [bill]
            outputs:
              - path: "a/{scope}.json"
              - path: "a/{scope}.json/x"
        """))  # fmt: skip
    problems = problems_of(path)
    assert [(p.line, p.key_path) for p in problems] == [
        (15, "merchants[1].outputs[0].path"),
        (16, "merchants[1].outputs[1].path"),
    ]
    assert "/out/a/bill.json: a/bill" in problems[0].message
    assert "b/bill" in problems[0].message
    assert "inside /out/a/bill.json, which a/bill" in problems[1].message  # file and dir


def test_merchant_with_errors_still_takes_part_in_the_output_check(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", HEAD + textwrap.dedent("""\
        outputs: [{path: all.json}]
        merchants:
          - {id: a, username: u, password: pw, scopes: [bill]}
          - {id: b, username: 5, password: pw, scopes: [bill]}
        """))  # fmt: skip
    problems = problems_of(path)
    assert [(p.line, p.key_path) for p in problems] == [
        (4, "outputs[0].path"),
        (7, "merchants[1].username"),
    ]


def test_duplicate_merchant_ids_are_not_reported_twice(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", HEAD + MERCHANT + MERCHANT.replace("merchants:\n", ""))
    assert_only(problems_of(path), 9, "merchants[1].id", "duplicate merchant id 'm1'")


# -- only ConfigError, whatever the input ---------------------------------------------

ROBUST = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def valid_document(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, bytes]]:
    """A valid config using every feature, in a directory with its secrets and includes."""
    root = tmp_path_factory.mktemp("robust")
    shutil.copy(EXAMPLE, root / "example.yaml")
    write(root / "secrets/berlin-01", "pw\n")
    write(root / "creds/hamburg-02", "pw\n")
    write(root / "merchants.d/a.yaml", MERCHANT)
    content = (root / "example.yaml").read_bytes()
    load_config(root / "example.yaml", environ={"CREDENTIALS_DIRECTORY": str(root / "creds")})
    yield root, content


def load_only_config_error(root: Path, content: bytes) -> None:
    path = root / "config.yaml"
    path.write_bytes(content)
    try:
        load_config(path, environ={"CREDENTIALS_DIRECTORY": str(root / "creds")})
    except ConfigError as e:
        assert e.problems
        assert all(isinstance(p, ConfigProblem) for p in e.problems)
        str(e)


@ROBUST
@given(text=st.text())
def test_random_text_raises_only_config_error(
    valid_document: tuple[Path, bytes], text: str
) -> None:
    load_only_config_error(valid_document[0], text.encode("utf-8", "surrogatepass"))


# Bytes that change YAML structure most, plus one that is not UTF-8.
YAML_BITS = [
    b"-",
    b":",
    b" ",
    b"\n",
    b"\t",
    b"{",
    b"[",
    b"'",
    b'"',
    b"*",
    b"&a ",
    b"!!",
    b"~",
    b"\xff",
]
KEYS = ["version", "identity", "client_id", "merchants", "id", "scopes", "outputs", "path", "mode"]


@ROBUST
@given(data=st.data())
def test_mutated_documents_raise_only_config_error(
    valid_document: tuple[Path, bytes], data: st.DataObject
) -> None:
    root, content = valid_document
    mutated = bytearray(content)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(mutated)))
        op = data.draw(st.sampled_from(["replace", "insert", "delete", "duplicate"]))
        if op == "replace" and at < len(mutated):
            mutated[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            mutated[at:at] = data.draw(st.sampled_from(YAML_BITS))
        elif op == "delete":
            del mutated[at : at + data.draw(st.integers(1, 40))]
        else:  # repeat a line somewhere else: duplicate keys and ids
            lines = bytes(mutated).splitlines(keepends=True)
            line = lines[data.draw(st.integers(0, len(lines) - 1))]
            mutated[at:at] = line
    load_only_config_error(root, bytes(mutated))


@ROBUST
@given(
    document=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(KEYS) | st.text(max_size=5),
                children,
                max_size=4,
            )
        ),
        max_leaves=20,
    )
)
def test_random_yaml_structures_raise_only_config_error(
    valid_document: tuple[Path, bytes], document: object
) -> None:
    load_only_config_error(valid_document[0], yaml.safe_dump(document).encode())
