"""Located YAML: read a file into a node tree and pull typed values out of it.

PyYAML's constructors throw away where a value came from, keep the last of two duplicate
keys and turn ``no`` into ``False`` without a word. The config loader therefore composes
the node tree only and walks it through ``Value`` (a node plus its file and key path) with
the readers below. Every reader either returns the typed value or reports a
``ConfigProblem`` at the node and returns ``None``, so one walk collects every mistake.

Caveats: a scalar with an explicit ``!!str`` tag is indistinguishable from a plain one
after composing, so ``!!str 1e3`` still gets the "quote it" advice. Messages never quote
a value read with ``secret=True``; a YAML syntax error names at most the single offending
character, since a syntax error may sit inside an unquoted secret.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from .errors import ConfigProblem

# libyaml composes about three times faster, which matters for 10,000 merchants, and it
# refuses nesting deeper than 1000 levels (the pure-Python composer raises RecursionError,
# which read_document catches). Both report the same lines and columns.
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)

_TAG = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
SEQ, MAP = _TAG + "seq", _TAG + "map"
MERGE = _TAG + "merge"

_KIND = {
    BOOL: "a boolean",
    INT: "an integer",
    FLOAT: "a number",
    NULL: "null (no value)",
    _TAG + "timestamp": "a date",
    _TAG + "value": "a special value",
    MERGE: "a merge key",
    _TAG + "binary": "binary data",
}

# Plain scalars that YAML 1.1 (PyYAML) reads as strings but YAML 1.2 tools (yq, Go, most
# editors' linters) read as numbers: "1e3", "0789", "0o17", "1.5e3". A file round-tripped
# through such a tool would change meaning, so these count as surprises too.
_YAML12_NUMBER = re.compile(
    r"[-+]?(?:[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)"
    r"|[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)

_S = TypeVar("_S", bound=str)

_NAMED = re.compile(r"(alias|anchor|tag handle) '[^']*'")

# int() / float() of YAML text, without PyYAML's object-construction bookkeeping.
_CONSTRUCTOR = SafeConstructor()


class UnreadableFile(Exception):
    """A file could not be read; ``reason`` is fit for a message (no file content)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_regular_file(path: Path, *, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at ``path``; raise UnreadableFile saying why not.

    Opened non-blocking and checked with fstat, so a FIFO or a device named by mistake is
    refused at once instead of hanging or reading forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise UnreadableFile(e.strerror or str(e)) from None
    except ValueError:  # an embedded NUL, or a lone surrogate from a YAML escape
        raise UnreadableFile("the path is not a valid file name") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnreadableFile("not a regular file")
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise UnreadableFile(f"larger than {max_bytes} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise UnreadableFile(e.strerror or str(e)) from None
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Doc:
    """One config file being read; problems found in it go to the shared list."""

    file: Path  # absolute
    problems: list[ConfigProblem]

    def report(self, line: int | None, column: int | None, key_path: str, msg: str) -> None:
        problem = ConfigProblem(
            file=str(self.file), line=line, column=column, key_path=key_path, message=msg
        )
        self.problems.append(problem)


def read_document(doc: Doc) -> Value | None:
    """The single YAML document of ``doc.file`` as the root Value, or None after reporting.

    Missing, unreadable, non-UTF-8, empty and syntactically broken files are all reported
    as problems of that file; nothing here raises.
    """
    try:
        data = read_regular_file(doc.file)
    except UnreadableFile as e:
        doc.report(None, None, "", f"cannot read the file: {e.reason}")
        return None
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM, as YAML itself does
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        doc.report(line, column, "", f"not UTF-8 text (byte 0x{data[e.start]:02x})")
        return None
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = f"invalid YAML: {e.problem or e.context}"
        if e.problem and e.context:
            msg += f" ({e.context})"
        # PyYAML quotes alias, anchor and tag names, which may be an unquoted secret that
        # starts with * & or !; libyaml leaves them out, and so do we. The mark still
        # points at the spot.
        msg = _NAMED.sub(r"\1", msg)
        if mark is None:
            doc.report(None, None, "", msg)
        else:
            doc.report(mark.line + 1, mark.column + 1, "", msg)
        return None
    except ReaderError as e:
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        doc.report(line, column, "", f"invalid YAML: {e.reason} ({char})")
        return None
    except yaml.YAMLError as e:  # not raised by PyYAML 6, but the base class promises no more
        doc.report(None, None, "", f"invalid YAML: {type(e).__name__}")
        return None
    except RecursionError:
        doc.report(None, None, "", "invalid YAML: nested too deeply")
        return None
    if node is None:
        doc.report(None, None, "", "the file is empty (no YAML document in it)")
        return None
    return Value(doc, node, "")


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass(frozen=True, slots=True)
class Value:
    """A YAML node, the file it is in and its key path (``merchants[2].scopes[0]``)."""

    doc: Doc
    node: Node
    path: str

    @property
    def line(self) -> int | None:
        mark = self.node.start_mark
        return None if mark is None else mark.line + 1

    @property
    def column(self) -> int | None:
        mark = self.node.start_mark
        return None if mark is None else mark.column + 1

    @property
    def where(self) -> str:
        """``file:line`` of this value, for messages that point at a second place."""
        return f"{self.doc.file}:{self.line}" if self.line is not None else str(self.doc.file)

    def problem(self, message: str, *, key: str | None = None) -> None:
        """Report a problem at this node; ``key`` names a (missing) key below it."""
        path = self.path if key is None else join(self.path, key)
        self.doc.report(self.line, self.column, path, message)

    def child(self, key: str, node: Node) -> Value:
        return Value(self.doc, node, join(self.path, key))

    def item(self, index: int, node: Node) -> Value:
        return Value(self.doc, node, f"{self.path}[{index}]")

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, ScalarNode) and self.node.tag == NULL

    @property
    def is_plain(self) -> bool:
        # Plain (unquoted) style: None from the pure-Python composer, "" from libyaml.
        return isinstance(self.node, ScalarNode) and not self.node.style


def describe(node: Node) -> str:
    """What a node is, in words: "a list", "a boolean", "a string"."""
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    if node.tag == STR:
        return "a string"
    return _KIND.get(node.tag, f"a value tagged {node.tag}")


def closest(word: str, options: Collection[str]) -> str | None:
    """The option most like ``word`` (ignoring case), if any is close enough."""
    by_lower = {o.lower(): o for o in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def suggest(word: str, options: Collection[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest option, or ""."""
    close = closest(word, options)
    return f" (did you mean {close!r}?)" if close else ""


def quoted(text: str) -> str:
    """``text`` as a double-quoted YAML scalar, for "quote it" advice."""
    return json.dumps(text, ensure_ascii=False)


def _bad_tag(v: Value, expected: str) -> bool:
    """Report a node whose tag is not a standard one for its kind (``!foo``, ``!!set``)."""
    tag = v.node.tag
    if isinstance(v.node, MappingNode):
        if tag == MAP:
            return False
    elif isinstance(v.node, SequenceNode):
        if tag == SEQ:
            return False
    elif tag == STR or tag in _KIND:
        return False
    v.problem(f"expected {expected}, got a value with the unsupported tag {tag}")
    return True


def mapping(
    v: Value,
    known: Collection[str],
    *,
    hints: Mapping[str, str] | None = None,
    null_is_empty: bool = False,
) -> dict[str, Value] | None:
    """The entries of a mapping by key; duplicate, unknown and non-string keys reported.

    ``hints`` replaces the generic "unknown key" message for keys that are known to be
    misplaced. A duplicated key keeps its first value, so the value the user probably
    looked at is validated; both places appear in the message.
    """
    if null_is_empty and v.is_null:
        return {}
    if not isinstance(v.node, MappingNode):
        if not _bad_tag(v, "a mapping"):
            v.problem(f"expected a mapping, got {describe(v.node)}")
        return None
    if _bad_tag(v, "a mapping"):
        return None
    entries: dict[str, Value] = {}
    keys: dict[str, Value] = {}
    for key_node, value_node in v.node.value:
        if not isinstance(key_node, ScalarNode):
            Value(v.doc, key_node, v.path).problem(
                f"a key must be a plain name, got {describe(key_node)}"
            )
            continue
        name = str(key_node.value)
        key = v.child(name, key_node)
        if key_node.tag == MERGE:
            # Merge keys were dropped in YAML 1.2 and make "where is this set" hard to
            # answer; aliases of whole values (outputs: *default_outputs) still work.
            key.problem("merge keys (<<) are not supported; use an alias of a whole value")
            continue
        if name in keys:
            key.problem(f"duplicate key {name!r} (first at line {keys[name].line})")
            continue
        keys[name] = key
        if name not in known:
            if hints and name in hints:
                key.problem(hints[name])
            else:
                hint = suggest(name, known) or f"; expected one of: {', '.join(known)}"
                key.problem(f"unknown key {name!r}{hint}")
            continue
        entries[name] = v.child(name, value_node)
    return entries


def require(fields: Mapping[str, Value], key: str, parent: Value) -> Value | None:
    """``fields[key]``, or None after reporting it missing at ``parent``."""
    value = fields.get(key)
    if value is None:
        parent.problem(f"missing required key {key!r}", key=key)
    return value


def sequence(v: Value, *, null_is_empty: bool = False) -> list[Value] | None:
    """The items of a list, each with its ``[i]`` key path."""
    if null_is_empty and v.is_null:
        return []
    if not isinstance(v.node, SequenceNode):
        if not _bad_tag(v, "a list"):
            hint = " (use [] for none)" if v.is_null else ""
            v.problem(f"expected a list, got {describe(v.node)}{hint}")
        return None
    if _bad_tag(v, "a list"):
        return None
    return [v.item(i, n) for i, n in enumerate(v.node.value)]


def string(
    v: Value, *, secret: bool = False, what: str = "a string", text: bool = True
) -> str | None:
    """A non-empty YAML string.

    ``text=True`` (ids, names, paths): a scalar that YAML reads as something else gets
    "quote it" advice, and so does a plain one that YAML 1.2 tools read as a number.
    ``text=False`` (durations, enumerations): the string is parsed further, so a number or
    boolean is merely the wrong type. With ``secret=True`` no message shows the value.
    """
    node = v.node
    if not isinstance(node, ScalarNode):
        if not _bad_tag(v, what):
            v.problem(f"expected {what}, got {describe(node)}")
        return None
    if _bad_tag(v, what):
        return None
    raw = str(node.value)
    if node.tag != STR:
        if node.tag == NULL and raw in ("", "~"):
            v.problem(f"expected {what}, got an empty value")
        elif not text or not v.is_plain:  # quoting would not help (or did not: !!int "5")
            shown = "" if secret or not v.is_plain else f" ({raw})"
            v.problem(f"expected {what}, got {describe(node)}{shown}")
        elif secret:
            v.problem(f"expected {what} but YAML reads this value as {describe(node)}; quote it")
        else:
            v.problem(
                f"expected {what} but YAML reads {raw} as {describe(node)}; quote it: {quoted(raw)}"
            )
        return None
    if text and v.is_plain and _YAML12_NUMBER.fullmatch(raw):
        shown = "this value" if secret else raw
        advice = "quote it" if secret else f"quote it: {quoted(raw)}"
        v.problem(f"expected {what} but YAML 1.2 tools read {shown} as a number; {advice}")
        return None
    if not raw:
        v.problem("must not be empty")
        return None
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
        v.problem("contains an invalid character (a lone surrogate from a \\u escape)")
        return None
    return raw


def _scalar_number(v: Value, what: str) -> int | float | None:
    node = v.node
    if not isinstance(node, ScalarNode) or node.tag not in (INT, FLOAT):
        if not _bad_tag(v, what):
            v.problem(f"expected {what}, got {describe(node)}")
        return None
    try:
        if node.tag == INT:
            return _CONSTRUCTOR.construct_yaml_int(node)
        return _CONSTRUCTOR.construct_yaml_float(node)
    except (ValueError, LookupError, TypeError, ArithmeticError):  # e.g. !!int "abc"
        v.problem(f"expected {what}, got {quoted(str(node.value))}, which is not one")
        return None


def integer(v: Value, *, what: str = "an integer") -> int | None:
    if isinstance(v.node, ScalarNode) and v.node.tag == FLOAT:
        v.problem(f"expected {what}, got {v.node.value}")
        return None
    value = _scalar_number(v, what)
    return None if value is None else int(value)


def number(v: Value, *, what: str = "a number") -> float | None:
    value = _scalar_number(v, what)
    if value is None:
        return None
    result = float(value)
    if not math.isfinite(result):
        v.problem(f"expected a finite number, got {v.node.value}")
        return None
    return result


def choice(v: Value, options: Sequence[_S]) -> _S | None:
    """One of ``options``, with the closest one suggested for a typo."""
    what = "one of " + ", ".join(options)
    text = string(v, what=what, text=False)
    if text is None:
        return None
    for option in options:
        if option == text:
            return option
    v.problem(f"{text!r} is not {what}{suggest(text, options)}")
    return None


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([smhd])")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(v: Value) -> float | None:
    """Seconds from ``90s``, ``5m``, ``1h``, ``1d`` (or ``1h30m``) or a plain number; > 0."""
    what = "a duration like 90s, 5m, 1h, 1d or a number of seconds"
    node = v.node
    seconds: float | None
    if isinstance(node, ScalarNode) and node.tag in (INT, FLOAT):
        seconds = number(v, what=what)
        if seconds is None:
            return None
    else:
        text = string(v, what=what, text=False)
        if text is None:
            return None
        spec = text.strip()
        if _DURATION.fullmatch(spec):
            seconds = sum(float(n) * _SECONDS[u] for n, u in _DURATION_PART.findall(spec))
        elif _DECIMAL.fullmatch(spec):  # "90", or 1e3 that YAML 1.1 left a string
            seconds = float(spec)
        else:
            v.problem(f"expected {what}, got {quoted(text)}")
            return None
        if not math.isfinite(seconds):
            v.problem(f"{quoted(text)} is too long")
            return None
    if seconds <= 0:
        v.problem("must be longer than 0s")
        return None
    return seconds
