"""Config v1: typed, frozen settings and the strict loader that builds them from YAML.

``load_config(path)`` reads the main file and its includes, validates everything at once
and returns a ``Config``, or raises ``ConfigError`` listing every problem with file, line,
column and key path. ``Config.token_sets()`` expands merchants x scopes into the token sets
the supervisor runs.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import hashlib
import ipaddress
import itertools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, TypeVar, get_args
from urllib.parse import urlsplit

from yaml.nodes import ScalarNode

from ._yamlnodes import (
    INT,
    Doc,
    UnreadableFile,
    Value,
    choice,
    closest,
    duration,
    integer,
    mapping,
    number,
    quoted,
    read_document,
    read_regular_file,
    require,
    sequence,
    string,
    suggest,
)
from .errors import ConfigError, ConfigProblem
from .secret import Secret

DEFAULT_TOKEN_URL = "https://adanybill.b2clogin.com/ad.anybill.de/oauth2/v2.0/token"
DEFAULT_POLICY = "b2c_1_ropc_vendor"
SCOPE_BASE = "https://ad.anybill.de/vendor/"
SHORT_SCOPES = ("bill", "category", "customer", "store", "user")
OFFLINE_ACCESS = "offline_access"

OutputFormat = Literal["json", "raw", "env", "header"]
OnRemove = Literal["delete", "keep"]
WatchMode = Literal["auto", "inotify", "poll"]


@dataclass(frozen=True, kw_only=True)
class IdentitySettings:
    client_id: str
    token_url: str = DEFAULT_TOKEN_URL
    policy: str = DEFAULT_POLICY
    timeout: float = 10.0
    ca_bundle: str | None = None
    max_concurrent_requests: int = 8
    max_requests_per_second: float = 10.0


@dataclass(frozen=True, kw_only=True)
class RefreshSettings:
    at: float = 0.5
    jitter: float = 0.1
    retry_initial: float = 1.0
    retry_max: float = 300.0
    blocked_retry: float = 3600.0


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """One output as configured: ``path`` still holds ``{merchant}`` / ``{scope}``."""

    path: str = "{merchant}/{scope}.json"
    format: OutputFormat = "json"
    mode: int = 0o640
    group: str | int | None = None  # resolved when writing: a missing group is an output error


@dataclass(frozen=True, kw_only=True)
class ReloadSettings:
    watch: WatchMode = "auto"
    poll_interval: float = 5.0


@dataclass(frozen=True, kw_only=True)
class Scope:
    name: str  # short name: "bill", or the last path segment of a full URI
    uri: str  # full URI sent to the IdP


@dataclass(frozen=True, kw_only=True)
class Merchant:
    id: str
    username: str
    password: Secret
    scopes: tuple[Scope, ...]
    outputs: tuple[OutputSpec, ...] | None = None  # None: the default outputs
    client_id: str | None = None  # None: identity.client_id


@dataclass(frozen=True, kw_only=True)
class OutputTarget:
    """One output of one token set, with its path rendered and made absolute."""

    path: Path
    format: OutputFormat
    mode: int
    group: str | int | None


@dataclass(frozen=True, kw_only=True)
class TokenSetSpec:
    """Everything one keeper needs: who logs in where, for what, and where it publishes."""

    merchant: str
    scope: Scope
    username: str
    password: Secret
    client_id: str
    token_url: str
    policy: str
    timeout: float
    outputs: tuple[OutputTarget, ...]
    refresh: RefreshSettings

    @property
    def key(self) -> tuple[str, str]:
        return (self.merchant, self.scope.name)

    @property
    def scope_param(self) -> str:
        """The ``scope`` form field: the scope's URI plus offline_access."""
        return f"{self.scope.uri} {OFFLINE_ACCESS}"

    def grant_fingerprint(self) -> str:
        """Identifies who issued a grant; a stored grant is reused only if this matches."""
        raw = "\0".join((self.token_url, self.policy, self.client_id, self.username))
        return hashlib.sha256(raw.encode()).hexdigest()

    def login_fingerprint(self) -> str:
        """Changes whenever a new login is needed: grant identity, scope or secret."""
        raw = "\0".join((self.grant_fingerprint(), self.scope.uri, self.password.fingerprint()))
        return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Config:
    source: Path  # the main config file, absolute
    identity: IdentitySettings
    refresh: RefreshSettings = RefreshSettings()
    outputs: tuple[OutputSpec, ...] = (OutputSpec(),)
    output_dir: Path = Path("/var/lib/anybilld/tokens")
    state_dir: Path = Path("/var/lib/anybilld/state")
    on_remove: OnRemove = "delete"
    listen_host: str = "127.0.0.1"
    listen_port: int = 9464
    reload: ReloadSettings = ReloadSettings()
    include: tuple[str, ...] = ()
    merchants: tuple[Merchant, ...] = ()
    # Every file the config was read from (main file, includes, secret files): what a
    # watcher must watch. Not part of equality: the content already is.
    files: tuple[Path, ...] = field(default=(), compare=False)

    def token_sets(self, merchants: Iterable[Merchant] | None = None) -> tuple[TokenSetSpec, ...]:
        """Every (merchant, scope) as a spec, in config order (GC paused: see load_config);
        only those of ``merchants`` when given."""
        with _gc_paused():
            return self._token_sets(self.merchants if merchants is None else merchants)

    def reusing(self, running: Config) -> Config:
        """This config, with every merchant entry equal to one of ``running``'s replaced by
        that very object.

        Equal either way; the point is memory. A reload of 10,000 token sets allocates the
        new entries among the loader's short-lived YAML nodes; kept, they pin those pages
        (about 10 MB that never went back to the system, reload after reload). Replaced,
        they die with the nodes, and so does the memory the load took.
        """
        before = {m.id: m for m in running.merchants}
        merchants = tuple(
            old if (old := before.get(m.id)) is not None and old == m else m for m in self.merchants
        )
        return replace(self, merchants=merchants)

    def token_set_defaults(self) -> tuple[object, ...]:
        """Everything besides a merchant's own entry that its token-set specs are built from."""
        return (self.identity, self.refresh, self.outputs, self.output_dir)

    def _token_sets(self, merchants: Iterable[Merchant]) -> tuple[TokenSetSpec, ...]:
        specs = []
        for m in merchants:
            for scope in m.scopes:
                specs.append(
                    TokenSetSpec(
                        merchant=m.id,
                        scope=scope,
                        username=m.username,
                        password=m.password,
                        client_id=m.client_id or self.identity.client_id,
                        token_url=self.identity.token_url,
                        policy=self.identity.policy,
                        timeout=self.identity.timeout,
                        outputs=tuple(
                            self._target(o, m.id, scope.name) for o in self.outputs_of(m)
                        ),
                        refresh=self.refresh,
                    )
                )
        return tuple(specs)

    def outputs_of(self, m: Merchant) -> tuple[OutputSpec, ...]:
        return m.outputs if m.outputs is not None else self.outputs

    def _target(self, o: OutputSpec, merchant: str, scope: str) -> OutputTarget:
        rendered = render_output_path(o.path, merchant=merchant, scope=scope)
        return OutputTarget(
            path=self.output_dir / rendered, format=o.format, mode=o.mode, group=o.group
        )


def render_output_path(template: str, *, merchant: str, scope: str) -> str:
    """Fill ``{merchant}`` and ``{scope}``; other braces are left as they are."""
    return template.replace("{merchant}", merchant).replace("{scope}", scope)


def load_config(
    path: Path,
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read, validate and resolve the config at ``path``; raise ConfigError listing all problems.

    ``environ`` (default: ``os.environ``) supplies ``password_env`` variables and
    ``CREDENTIALS_DIRECTORY`` for ``password_credential``.

    Relative paths (``output_dir``, ``state_dir``, ``ca_bundle``, ``include``) are resolved
    against the main file's directory, ``password_file`` against the directory of the file
    that names it. Symlinks are kept as written, not resolved, so a watcher sees the path
    an operator swaps (a Kubernetes ConfigMap's ``..data`` link, for one). Whatever the
    input, the only exception raised is ConfigError.
    """
    try:
        source = Path(os.path.abspath(path))
    except OSError as e:  # a relative path, and the working directory is gone
        problem = f"cannot resolve the path: {e.strerror}"
        raise ConfigError(
            [ConfigProblem(file=str(path), line=None, column=None, key_path="", message=problem)]
        ) from None
    # The loader allocates a few hundred thousand short-lived objects for 10,000 token
    # sets; with the cyclic GC running, each full collection on the way also walks every
    # object of the running daemon. Nothing here makes cycles worth collecting early.
    with _gc_paused():
        return _Loader(source, os.environ if environ is None else environ).load()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_TOP_KEYS = (
    "version",
    "identity",
    "refresh",
    "outputs",
    "output_dir",
    "state_dir",
    "on_remove",
    "listen",
    "reload",
    "include",
    "merchants",
)
_IDENTITY_KEYS = tuple(f.name for f in fields(IdentitySettings))
_REFRESH_KEYS = tuple(f.name for f in fields(RefreshSettings))
_OUTPUT_KEYS = tuple(f.name for f in fields(OutputSpec))
_RELOAD_KEYS = tuple(f.name for f in fields(ReloadSettings))
_SECRET_KEYS = ("password_file", "password_env", "password_credential", "password")
_MERCHANT_KEYS = ("id", "username", *_SECRET_KEYS, "scopes", "outputs", "client_id")
_INCLUDE_HINTS = {
    key: f"{key} belongs in the main config file; an included file holds only merchants:"
    for key in _TOP_KEYS
    if key != "merchants"
} | {"include": "an included file cannot include further files"}

_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)
_ON_REMOVE: tuple[OnRemove, ...] = get_args(OnRemove)
_WATCH: tuple[WatchMode, ...] = get_args(WatchMode)

# Ids and scope names become file names, directory names and metric labels.
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_POLICY = re.compile(r"[A-Za-z0-9._-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_MODE = re.compile(r"(?:0o)?([0-7]{3,4})")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_LISTEN = re.compile(rf"({_LABEL}(?:\.{_LABEL})*):([0-9]+)")
_LISTEN_V6 = re.compile(r"\[([^\]]+)\]:([0-9]+)")
_GLOB_MAGIC = re.compile(r"[*?[]")
_MAX_SECRET_BYTES = 64 * 1024  # a password file this big is the wrong file
_MAX_GID = 0xFFFFFFFE  # (gid_t)-1 means "leave unchanged" to chown

_T = TypeVar("_T")
_IDENTITY_DEFAULTS = IdentitySettings(client_id="")
_REFRESH_DEFAULTS = RefreshSettings()
_RELOAD_DEFAULTS = ReloadSettings()
_CONFIG_DEFAULTS = Config(source=Path("/"), identity=_IDENTITY_DEFAULTS)


def _get(
    fields: Mapping[str, Value], key: str, read: Callable[[Value], _T | None], default: _T
) -> _T:
    """``read(fields[key])``, or ``default`` when the key is absent or its value invalid.

    An invalid value has been reported already; the default only lets the walk go on.
    """
    value = fields.get(key)
    if value is None:
        return default
    result = read(value)
    return default if result is None else result


def _name(v: Value, what: str) -> str | None:
    """A merchant id or scope name: it names files, directories and metric labels."""
    text = string(v)
    if text is None:
        return None
    if text in (".", ".."):
        v.problem(f"{what} must not be {text!r} (it names a directory)")
        return None
    if not _NAME.fullmatch(text):
        v.problem(
            f"{what} {text!r} may contain only letters, digits, '.', '_' and '-' "
            "(it names files and metric labels)"
        )
        return None
    return text


def _positive_int(v: Value) -> int | None:
    n = integer(v)
    if n is not None and n < 1:
        v.problem(f"must be at least 1, got {n}")
        return None
    return n


def _positive_number(v: Value) -> float | None:
    x = number(v)
    if x is not None and x <= 0:
        v.problem(f"must be greater than 0, got {v.node.value}")
        return None
    return x


def _fraction(v: Value) -> float | None:
    x = number(v, what="a fraction between 0 and 1")
    if x is not None and not 0 < x < 1:
        v.problem(f"must be between 0 and 1 (exclusive), got {v.node.value}")
        return None
    return x


def _non_negative(v: Value) -> float | None:
    x = number(v)
    if x is not None and x < 0:
        v.problem(f"must not be negative, got {v.node.value}")
        return None
    return x


def _client_id(v: Value) -> str | None:
    text = string(v)
    if text is not None and (text != text.strip() or any(c.isspace() for c in text)):
        v.problem("must not contain whitespace")
        return None
    return text


def _policy(v: Value) -> str | None:
    text = string(v)
    if text is not None and not _POLICY.fullmatch(text):
        v.problem(f"{text!r} is not a B2C policy name (letters, digits, '.', '_', '-')")
        return None
    return text


def _url(v: Value) -> str | None:
    text = string(v)
    if text is None:
        return None
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:  # an unbalanced "[" in the host
        host = None
    else:
        if parts.scheme not in ("http", "https"):
            host = None
    if not host or any(c.isspace() for c in text):
        v.problem(f"expected an http(s) URL, got {quoted(text)}")
        return None
    return text


def _mode(v: Value) -> int | None:
    node = v.node
    if isinstance(node, ScalarNode) and node.tag == INT and v.is_plain:
        # 0640 unquoted is YAML 1.1 octal (416) but 640 is decimal: too easy to get wrong.
        raw = str(node.value)
        digits = raw.removeprefix("0o").lstrip("0") or "0"
        hint = f"0{digits}" if re.fullmatch(r"[0-7]{3}", digits) else "0640"
        v.problem(
            f"expected a quoted octal string but YAML reads {raw} as an integer; "
            f"quote it: mode: {quoted(hint)}"
        )
        return None
    text = string(v, what='a quoted octal mode like "0640"', text=False)
    if text is None:
        return None
    match = _MODE.fullmatch(text)
    if match is None:
        v.problem(f'expected an octal mode like "0640", got {quoted(text)}')
        return None
    mode = int(match.group(1), 8)
    if mode > 0o777:
        v.problem(
            f"mode {text} sets bits above 0777 (setuid, setgid or sticky); "
            "token files need none of them"
        )
        return None
    return mode


def _output_path(v: Value) -> str | None:
    """A relative path template that cannot leave output_dir.

    It cannot escape because it is relative, has no ``..`` segment, and its placeholders
    are filled with merchant ids and scope names, which are never ``.``, ``..`` or contain
    ``/``.
    """
    text = string(v)
    if text is None:
        return None
    ok = True
    if text.startswith("/"):
        v.problem("must be relative to output_dir, got an absolute path")
        ok = False
    if ".." in text.split("/"):
        v.problem("must not contain a '..' segment (it would leave output_dir)")
        ok = False
    if text.endswith("/") or text.endswith("/.") or text == ".":
        v.problem("names a directory; end it with a file name")
        ok = False
    if "\0" in text:
        v.problem("contains a NUL character")
        ok = False
    for match in _PLACEHOLDER.finditer(text):
        name = match.group(1)
        if name not in ("merchant", "scope"):
            close = closest(name, ("merchant", "scope"))
            hint = f" (did you mean {{{close}}}?)" if close else ""
            v.problem(
                f"unknown placeholder {{{name}}}{hint}; only {{merchant}} and "
                "{scope} are filled in"
            )
            ok = False
    if ok and ("{" in _PLACEHOLDER.sub("", text) or "}" in _PLACEHOLDER.sub("", text)):
        v.problem("a stray brace; only {merchant} and {scope} may appear in braces")
        ok = False
    return text if ok else None


def _listen(v: Value) -> tuple[str, int] | None:
    text = string(v, what='"host:port" like 127.0.0.1:9464', text=False)
    if text is None:
        return None
    if match := _LISTEN_V6.fullmatch(text):
        host, port = match.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            v.problem(f"{host!r} is not an IPv6 address")
            return None
    elif text.count(":") > 1 and not text.startswith("["):
        v.problem(f"an IPv6 address needs brackets, like [::1]:9464; got {quoted(text)}")
        return None
    elif match := _LISTEN.fullmatch(text):
        host, port = match.groups()
        if host.replace(".", "").isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                v.problem(f"{host!r} is not an IPv4 address")
                return None
    else:
        v.problem(f'expected "host:port" like 127.0.0.1:9464 or [::1]:9464, got {quoted(text)}')
        return None
    if int(port) > 65535:
        v.problem(f"port must be a number from 0 to 65535, got {port}")
        return None
    return host, int(port)


# Python's \s is str.isspace(): any Unicode whitespace.
_WHITESPACE = re.compile(r"\s")


def _scope(v: Value) -> Scope | None:
    text = string(v)
    if text is None:
        return None
    if text == OFFLINE_ACCESS:
        v.problem(
            "offline_access is always requested (it brings the refresh token); "
            "remove it from scopes"
        )
        return None
    if _WHITESPACE.search(text):
        # The scope form field is space-separated: a space would request two scopes.
        v.problem(f"must not contain whitespace, got {quoted(text)}")
        return None
    if text in SHORT_SCOPES:
        return Scope(name=text, uri=SCOPE_BASE + text)
    if not text.startswith("https://"):
        v.problem(
            f"unknown scope {text!r}{suggest(text, SHORT_SCOPES)}; use one of "
            f"{', '.join(SHORT_SCOPES)} or a full https:// URI"
        )
        return None
    try:
        parts = urlsplit(text)
    except ValueError:
        parts = None
    if parts is None or not parts.hostname or parts.query or parts.fragment:
        v.problem(f"expected a scope URI like {SCOPE_BASE}bill, got {quoted(text)}")
        return None
    name = parts.path.rsplit("/", 1)[-1]
    if name in ("", ".", "..") or not _NAME.fullmatch(name):
        v.problem(
            f"the last path segment of a scope URI names its token files and metrics, "
            f"so it must be letters, digits, '.', '_' or '-'; got {quoted(name)}"
        )
        return None
    return Scope(name=name, uri=text)


def _section(v: Value | None, keys: tuple[str, ...]) -> dict[str, Value]:
    """A mapping of settings; absent or empty (``refresh:`` alone) means all defaults."""
    if v is None:
        return {}
    return mapping(v, keys, null_is_empty=True) or {}


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a merchant was configured, for messages that involve several merchants."""

    merchant: Value  # the merchant's mapping
    outputs: tuple[Value | None, ...] | None  # its outputs' path values; None: the default


class _Loader:
    """One load: the problems found so far, the files read and the merchant ids seen."""

    def __init__(self, source: Path, environ: Mapping[str, str]) -> None:
        self.source = source
        self.base = self.source.parent
        self.environ = environ
        self.problems: list[ConfigProblem] = []
        self.files: dict[Path, None] = {}  # an ordered set
        self.ids: dict[str, Value] = {}
        self.merchants: list[Merchant] = []
        self.origins: list[_Origin] = []

    def load(self) -> Config:
        self.files[self.source] = None
        root = read_document(Doc(self.source, self.problems))
        top = None if root is None else mapping(root, _TOP_KEYS)
        if root is None or top is None:
            raise ConfigError(self.problems, files=tuple(self.files))
        self._version(top, root)
        identity = self._identity(top, root)
        refresh = self._refresh(_section(top.get("refresh"), _REFRESH_KEYS))
        outputs: tuple[OutputSpec, ...] = _CONFIG_DEFAULTS.outputs
        output_values: tuple[Value | None, ...] = (None,)
        if "outputs" in top:
            parsed = self._outputs(top["outputs"])
            if parsed is not None:
                outputs, output_values = parsed
        output_dir = _get(top, "output_dir", self._dir, _CONFIG_DEFAULTS.output_dir)
        state_dir = _get(top, "state_dir", self._dir, _CONFIG_DEFAULTS.state_dir)
        self._separate_dirs(top, output_dir, state_dir)
        on_remove = _get(
            top, "on_remove", lambda v: choice(v, _ON_REMOVE), _CONFIG_DEFAULTS.on_remove
        )
        host, port = _get(
            top, "listen", _listen, (_CONFIG_DEFAULTS.listen_host, _CONFIG_DEFAULTS.listen_port)
        )
        reload = self._reload(_section(top.get("reload"), _RELOAD_KEYS))
        include_files: list[Path] = []
        patterns = self._include(top["include"], include_files) if "include" in top else ()
        if "merchants" in top:
            self._merchants(top["merchants"], self.base)
        for file in include_files:
            self._include_file(file)

        config = Config(
            source=self.source,
            identity=identity,
            refresh=refresh,
            outputs=outputs,
            output_dir=output_dir,
            state_dir=state_dir,
            on_remove=on_remove,
            listen_host=host,
            listen_port=port,
            reload=reload,
            include=patterns,
            merchants=tuple(self.merchants),
            files=tuple(self.files),
        )
        self._check_output_paths(config, output_values)
        if self.problems:
            raise ConfigError(self._in_reading_order(), files=config.files, include=patterns)
        return config

    def _in_reading_order(self) -> list[ConfigProblem]:
        """Problems by file (in the order they were read), line and column.

        Checks run section by section and some span files, so the raw order jumps about.
        """
        order: dict[str, int] = {}
        for p in self.problems:
            order.setdefault(p.file, len(order))
        return sorted(self.problems, key=lambda p: (order[p.file], p.line or 0, p.column or 0))

    # -- top-level settings -------------------------------------------------------------

    def _version(self, top: dict[str, Value], root: Value) -> None:
        v = require(top, "version", root)
        if v is None:
            return
        n = integer(v, what="the integer 1")
        if n is not None and n != 1:
            v.problem(f"unsupported config version {n}; this anybilld reads version 1")

    def _identity(self, top: dict[str, Value], root: Value) -> IdentitySettings:
        v = require(top, "identity", root)
        f = {} if v is None else mapping(v, _IDENTITY_KEYS, null_is_empty=True)
        client_id = ""
        if v is not None and f is not None:  # else missing or not a mapping: reported
            cv = require(f, "client_id", v)
            client_id = (None if cv is None else _client_id(cv)) or ""
        f = f or {}
        d = _IDENTITY_DEFAULTS
        ca_bundle: str | None = None
        if "ca_bundle" in f and not f["ca_bundle"].is_null:
            ca_bundle = self._ca_bundle(f["ca_bundle"])
        return IdentitySettings(
            client_id=client_id,
            token_url=_get(f, "token_url", _url, d.token_url),
            policy=_get(f, "policy", _policy, d.policy),
            timeout=_get(f, "timeout", duration, d.timeout),
            ca_bundle=ca_bundle,
            max_concurrent_requests=_get(
                f, "max_concurrent_requests", _positive_int, d.max_concurrent_requests
            ),
            max_requests_per_second=_get(
                f, "max_requests_per_second", _positive_number, d.max_requests_per_second
            ),
        )

    def _ca_bundle(self, v: Value) -> str | None:
        path = self._path(v, self.base)
        if path is None:
            return None
        try:
            # Read now rather than at the first request, so --check and reload catch it.
            read_regular_file(path)
        except UnreadableFile as e:
            v.problem(f"cannot read ca_bundle {path}: {e.reason}")
            return None
        return str(path)

    def _refresh(self, f: dict[str, Value]) -> RefreshSettings:
        d = _REFRESH_DEFAULTS
        # The cross checks run only when both values were read fine: comparing against a
        # stand-in default would report a second, confusing problem.
        before = len(self.problems)
        at = _get(f, "at", _fraction, d.at)
        jitter = _get(f, "jitter", _non_negative, d.jitter)
        if len(self.problems) == before and not (at - jitter > 0 and at + jitter < 1):
            where = f.get("jitter") or f["at"]  # one of them was set: the defaults fit
            where.problem(
                f"refresh at {at:g} ± jitter {jitter:g} must stay between 0 and 1 (exclusive)"
            )
        before = len(self.problems)
        retry_initial = _get(f, "retry_initial", duration, d.retry_initial)
        retry_max = _get(f, "retry_max", duration, d.retry_max)
        if len(self.problems) == before and retry_initial > retry_max:
            where = f.get("retry_max") or f["retry_initial"]
            where.problem(
                f"retry_initial ({retry_initial:g}s) must not exceed retry_max ({retry_max:g}s)"
            )
        return RefreshSettings(
            at=at,
            jitter=jitter,
            retry_initial=retry_initial,
            retry_max=retry_max,
            blocked_retry=_get(f, "blocked_retry", duration, d.blocked_retry),
        )

    def _reload(self, f: dict[str, Value]) -> ReloadSettings:
        return ReloadSettings(
            watch=_get(f, "watch", lambda v: choice(v, _WATCH), _RELOAD_DEFAULTS.watch),
            poll_interval=_get(f, "poll_interval", duration, _RELOAD_DEFAULTS.poll_interval),
        )

    def _path(self, v: Value, base: Path) -> Path | None:
        """A path string made absolute against ``base`` (lexically: symlinks stay)."""
        text = string(v)
        if text is None:
            return None
        if "\0" in text:
            v.problem("contains a NUL character")
            return None
        return Path(os.path.normpath(os.path.join(base, text)))

    def _dir(self, v: Value) -> Path | None:
        return self._path(v, self.base)

    def _separate_dirs(self, top: dict[str, Value], output_dir: Path, state_dir: Path) -> None:
        # State files are state_dir/<merchant>/<scope>.json, the default token files
        # output_dir/<merchant>/<scope>.json: shared or nested, they overwrite each other
        # and refresh tokens could end up where consumers read.
        if (
            output_dir == state_dir
            or output_dir.is_relative_to(state_dir)
            or state_dir.is_relative_to(output_dir)
        ):
            where = top.get("state_dir") or top["output_dir"]
            where.problem(
                f"output_dir ({output_dir}) and state_dir ({state_dir}) must be "
                "separate directories, neither inside the other"
            )

    # -- outputs ------------------------------------------------------------------------

    def _outputs(self, v: Value) -> tuple[tuple[OutputSpec, ...], tuple[Value | None, ...]] | None:
        """The output specs and the values of their ``path`` keys, or None if any is bad."""
        items = sequence(v)
        if items is None:
            return None
        if not items:
            v.problem("needs at least one output (a token nobody can read is no use)")
            return None
        before = len(self.problems)
        specs: list[OutputSpec] = []
        paths: list[Value | None] = []
        d = OutputSpec()
        for item in items:
            f = mapping(item, _OUTPUT_KEYS)
            if f is None:
                continue
            pv = require(f, "path", item)
            path = None if pv is None else _output_path(pv)
            group: str | int | None = None
            gv = f.get("group")
            if gv is not None and not gv.is_null:
                if isinstance(gv.node, ScalarNode) and gv.node.tag == INT:
                    group = integer(gv)
                    if group is not None and not 0 <= group <= _MAX_GID:
                        gv.problem(f"a group id is between 0 and {_MAX_GID}, got {group}")
                else:
                    group = string(gv, what="a group name or id")
            specs.append(
                OutputSpec(
                    path=path or d.path,
                    format=_get(f, "format", lambda v: choice(v, _FORMATS), d.format),
                    mode=_get(f, "mode", _mode, d.mode),
                    group=group,
                )
            )
            paths.append(pv)
        if len(self.problems) > before:
            return None
        return tuple(specs), tuple(paths)

    def _check_output_paths(self, config: Config, default_paths: tuple[Value | None, ...]) -> None:
        """Report two token sets writing one file, or one writing inside another's file.

        Builds the targets as ``Config.token_sets()`` does, so it compares exactly the
        paths keepers write, without building the rest of each spec (the daemon's diff does
        that, once).
        """
        # Keyed by the path as a string: Path objects are already normalised, and string
        # keys and parent lookups cost a fraction of pathlib's for 10,000 token sets.
        writers: dict[str, list[tuple[str, Value, Value | None]]] = {}
        for merchant, origin in zip(config.merchants, self.origins, strict=True):
            path_values = default_paths if origin.outputs is None else origin.outputs
            outputs = config.outputs_of(merchant)
            for scope in merchant.scopes:
                targets = [config._target(o, merchant.id, scope.name) for o in outputs]
                for target, pv in zip(targets, path_values, strict=True):
                    who = f"{merchant.id}/{scope.name}"
                    writers.setdefault(str(target.path), []).append((who, origin.merchant, pv))

        def describe_writer(who: str, mv: Value, pv: Value | None) -> str:
            # Each place with its own line: the merchant's, and the output path's (which
            # for default outputs is shared by every merchant).
            if pv is None:  # the built-in default output
                return f"{who} (merchant at {mv.where})"
            return f"{who} (merchant at {mv.where}, {pv.path} at {pv.where})"

        root = str(config.output_dir)
        for path, ws in writers.items():
            if len(ws) > 1:
                # Point at a place that can be edited: a later writer's output path.
                _, mv, pv = next((w for w in ws[1:] if w[2] is not None), ws[1])
                names = [describe_writer(*w) for w in ws[:5]]
                more = f" and {len(ws) - 5} more" if len(ws) > 5 else ""
                (pv or mv).problem(
                    f"{len(ws)} token sets write the same file {path}: {', '.join(names)}{more}"
                )
            parent = path
            while len(parent := parent.rpartition("/")[0]) > len(root):
                other = writers.get(parent)
                if other:
                    who, mv, pv = ws[0]
                    (pv or mv).problem(
                        f"{describe_writer(who, mv, pv)} writes {path} inside {parent}, "
                        f"which {describe_writer(*other[0])} writes as a file"
                    )

    # -- include ------------------------------------------------------------------------

    def _include(self, v: Value, files: list[Path]) -> tuple[str, ...]:
        """The patterns as written; the files they match (sorted, once each) go to ``files``."""
        items = sequence(v, null_is_empty=True) or []
        patterns: list[str] = []
        seen: set[Path] = set()
        for item in items:
            pattern = string(item, what="a glob pattern")
            if pattern is None:
                continue
            if "\0" in pattern:
                item.problem("contains a NUL character")
                continue
            patterns.append(pattern)
            if _GLOB_MAGIC.search(pattern):
                # The directory the pattern starts from must exist: a missing merchants.d is
                # a typo, or a directory being swapped (`mv`), not "no merchants" — read as
                # that, a reload would stop and delete every merchant in it.
                fixed = itertools.takewhile(
                    lambda part: not _GLOB_MAGIC.search(part), Path(pattern).parts
                )
                head = Path(os.path.normpath(self.base.joinpath(*fixed)))
                if not head.is_dir():
                    item.problem(
                        f"no such directory: {head} (create it; an empty one includes nothing)"
                    )
                    continue
                # root_dir, not base / pattern: the base directory's own name may contain
                # glob characters. A pattern matching nothing is fine: an empty merchants.d.
                found = sorted(glob.glob(pattern, root_dir=self.base, recursive=True))
                matches = [Path(os.path.normpath(self.base / m)) for m in found]
                # The main file matching its own pattern (*.yaml next to it) is skipped.
                matches = [m for m in matches if not m.is_dir() and m != self.source]
            else:
                target = Path(os.path.normpath(self.base / pattern))
                if not os.path.lexists(target):
                    item.problem(f"no such file: {target}")
                    continue
                if target.is_dir():
                    item.problem(
                        f"{target} is a directory; include e.g. {pattern.rstrip('/')}/*.yaml"
                    )
                    continue
                if target == self.source:
                    item.problem("the main config file cannot include itself")
                    continue
                matches = [target]
            for match in matches:
                if match not in seen:
                    seen.add(match)
                    files.append(match)
        return tuple(patterns)

    def _include_file(self, file: Path) -> None:
        self.files[file] = None
        root = read_document(Doc(file, self.problems))
        if root is None:
            return
        top = mapping(root, ("merchants",), hints=_INCLUDE_HINTS)
        if top is None:
            return
        mv = require(top, "merchants", root)
        if mv is not None:
            self._merchants(mv, file.parent)

    # -- merchants ----------------------------------------------------------------------

    def _merchants(self, v: Value, base: Path) -> None:
        for item in sequence(v, null_is_empty=True) or []:
            self._merchant(item, base)

    def _merchant(self, item: Value, base: Path) -> None:
        f = mapping(item, _MERCHANT_KEYS)
        if f is None:
            return
        idv = require(f, "id", item)
        merchant_id = None if idv is None else _name(idv, "a merchant id")
        uv = require(f, "username", item)
        username = None if uv is None else string(uv)
        password = self._password(f, item, base)
        sv = require(f, "scopes", item)
        scopes = None if sv is None else self._scopes(sv)
        outputs: tuple[OutputSpec, ...] | None = None
        output_paths: tuple[Value | None, ...] | None = None
        outputs_ok = True
        if "outputs" in f:
            parsed = self._outputs(f["outputs"])
            outputs_ok = parsed is not None
            if parsed is not None:
                outputs, output_paths = parsed
        client_id = _get(f, "client_id", _client_id, None)

        if idv is None or merchant_id is None:
            return
        first = self.ids.get(merchant_id)
        if first is not None:
            # The second one is left out, so the output check does not report it again.
            idv.problem(
                f"duplicate merchant id {merchant_id!r}; first defined at "
                f"{first.where} ({first.path})"
            )
            return
        self.ids[merchant_id] = idv
        if not scopes or not outputs_ok:
            return
        # A merchant with a bad username or secret is still built, with placeholders, so
        # its output paths take part in the collision check; the problems already
        # recorded make sure this Config is never returned.
        self.merchants.append(
            Merchant(
                id=merchant_id,
                username=username or "",
                password=password or Secret(""),
                scopes=scopes,
                outputs=outputs,
                client_id=client_id,
            )
        )
        self.origins.append(_Origin(merchant=item, outputs=output_paths))

    def _password(self, f: dict[str, Value], item: Value, base: Path) -> Secret | None:
        given = [key for key in f if key in _SECRET_KEYS]  # in the order written
        if not given:
            item.problem(f"needs one of {', '.join(_SECRET_KEYS)}")
            return None
        if len(given) > 1:
            f[given[1]].problem(
                f"give exactly one of {', '.join(_SECRET_KEYS)}; found {' and '.join(given)}"
            )
            return None
        key = given[0]
        v = f[key]
        if key == "password":
            text = string(v, secret=True)
            return None if text is None else Secret(text)
        if key == "password_env":
            return self._password_env(v)
        if key == "password_file":
            path = self._path(v, base)
            return None if path is None else self._secret_file(v, path, "password_file")
        name = string(v)
        if name is None:
            return None
        if "/" in name or "\0" in name or name in (".", ".."):
            v.problem(f"{name!r} is not a credential name (a file name, as in LoadCredential=)")
            return None
        directory = self.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            v.problem(
                "password_credential needs $CREDENTIALS_DIRECTORY, which systemd sets "
                "for LoadCredential=/SetCredential=; it is not set"
            )
            return None
        path = Path(os.path.abspath(os.path.join(directory, name)))
        return self._secret_file(v, path, "credential")

    def _password_env(self, v: Value) -> Secret | None:
        name = string(v)
        if name is None:
            return None
        if not _ENV_NAME.fullmatch(name):
            v.problem(f"{name!r} is not an environment variable name")
            return None
        value = self.environ.get(name)
        if value is None:
            v.problem(f"environment variable {name} is not set")
            return None
        if not value:
            v.problem(f"environment variable {name} is empty")
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # os.environ keeps undecodable bytes as surrogates
            v.problem(f"environment variable {name} is not valid UTF-8")
            return None
        return Secret(value)

    def _secret_file(self, v: Value, path: Path, what: str) -> Secret | None:
        """A secret from a file, minus one trailing newline (``echo pw > file`` adds one)."""
        self.files[path] = None  # watched even while unreadable, to notice it appear
        try:
            data = read_regular_file(path, max_bytes=_MAX_SECRET_BYTES)
        except UnreadableFile as e:
            v.problem(f"cannot read {what} {path}: {e.reason}")
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            v.problem(f"{what} {path} is not UTF-8 text")
            return None
        text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
        if not text:
            v.problem(f"{what} {path} is empty")
            return None
        return Secret(text)

    def _scopes(self, v: Value) -> tuple[Scope, ...] | None:
        items = sequence(v)
        if items is None:
            return None
        if not items:
            v.problem("needs at least one scope")
            return None
        by_name: dict[str, tuple[Value, Scope]] = {}
        for item in items:
            scope = _scope(item)
            if scope is None:
                continue
            if scope.name in by_name:
                first, other = by_name[scope.name]
                if other.uri == scope.uri:
                    item.problem(f"duplicate scope {scope.name!r} (also {first.path})")
                else:
                    item.problem(
                        f"{scope.uri} and {other.uri} ({first.path}) both map to the "
                        f"scope name {scope.name!r}, which names token files and "
                        "metrics"
                    )
                continue
            by_name[scope.name] = (item, scope)
        return tuple(scope for _, scope in by_name.values())
