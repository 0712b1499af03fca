"""Files vis4mer reads and writes: the one YAML loader, YAML output, all-or-nothing writes."""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vis4mer.datasets.errors import UserError
from vis4mer.datasets.storage import read_text

# The checkout vis4mer runs from, holding sweeps/ and deploy/ (an editable install or the image's
# WORKDIR, as the Dockerfile builds it): the folder above orchestrator/.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MAX_YAML_NODES = 100_000  # a config, sweep or manifest is a few hundred; aliases could make billions
MAX_YAML_DEPTH = 64

# YAML 1.1 reads 1e-3 as a string; configs mean a number (OmegaConf's loader reads it so too)
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # no &id001 anchors: every file reads on its own
        return True


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses what would make a file mean something else than it reads: a key given
    twice (the last one would silently win), and documents nested deeper than MAX_YAML_DEPTH, that
    expand past MAX_YAML_NODES values (aliases of aliases: a 1-KB file can stand for billions, and
    every reader that walks it would take that long) or that contain themselves."""

    def compose_document(self):
        node = super().compose_document()
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES} values once its aliases are "
                                              "expanded", node.start_mark)
        return node

    def compose_node(self, parent, index):
        depth = getattr(self, "_depth", 0)
        if depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                              self.peek_event().start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(node, memo: dict) -> int:
    """Values in `node` with every alias expanded, counted in time linear in the file (memoised). A
    node that contains itself (`a: &a [*a]`) is refused: it has no finite value, and every reader
    that walks it would recurse without end."""
    if id(node) in memo:
        if memo[id(node)] is None:
            raise yaml.composer.ComposerError(None, None, "an alias inside the value it names (a cycle)",
                                              node.start_mark)
        return memo[id(node)]
    memo[id(node)] = None  # being counted
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_size(c, memo) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        n = 1
    memo[id(node)] = min(n, MAX_YAML_NODES + 1)
    return memo[id(node)]


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
# the writer quotes what the reader would take for a number ("1e400" stays a string when read back)
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _reason(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1})" if mark is not None else str(problem)


def parse_yaml(text: str, where: str) -> Any:
    """One YAML document; a UserError naming `where` when it is not valid YAML."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({_reason(e)})") from None
    except RecursionError:
        raise UserError(f"{where}: not valid YAML (nested too deeply)") from None


def load_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    return parse_yaml(read_text(path, what), str(path))


def load_yaml_documents(path: str | os.PathLike, what: str = "YAML file") -> list[Any]:
    """Every non-empty document of a multi-document file."""
    text = read_text(path, what)
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]  # noqa: S506
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({_reason(e)})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML (nested too deeply)") from None
    if not docs:
        raise UserError(f"{path}: no YAML document")
    return docs


# what YAML or a terminal takes as a line break or refuses: all but YAML's printable characters (tab too)
_CONTROL = re.compile("[^\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def one_line(text: str) -> str:
    """`text` with line breaks, other control characters and what YAML cannot hold escaped (a file
    name, a value, a command line the user gave), so that it stays one line in an error message or a
    comment."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def comment_lines(lines: Sequence[str]) -> str:
    """YAML comment lines, one per entry, each kept to one line (`one_line`): no value can end the
    comment and add YAML."""
    return "".join(f"# {one_line(ln)}\n" for ln in lines)


def dump_yaml(obj: Any, header: Sequence[str] = ()) -> str:
    """YAML in the objects' own key order, no anchors, lines unwrapped; `header` (comment lines) first."""
    body = yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=10_000)
    return comment_lines(header) + body


def check_file_target(path: str | os.PathLike, what: str = "--out") -> list[Path]:
    """A file that can be written: not a folder, not under a file, in a writable folder; a UserError
    naming `what` otherwise. Returns the folders that writing it must make, outermost first."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{what} {path}: is a folder; expected a file name")
    if os.path.lexists(target) and (target.is_symlink() or not target.is_file()):  # the rename would replace it
        raise UserError(f"{what} {path}: is a symlink, device or pipe; expected a regular file name (it is "
                        "replaced as a whole)")
    made = []  # the folders to make, deepest last
    for parent in [target.parent, *target.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise UserError(f"{what} {path}: {parent} is not writable")
            break
        made.insert(0, parent)
    return made


def _new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 less the process's umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, text: str | bytes, what: str = "--out") -> None:
    """All or nothing: a temporary file beside the target, renamed over it once written; missing
    folders are made (and removed again if the write fails). A UserError naming `what` when the
    target cannot be written (a folder, under a file, read-only)."""
    target = Path(path)
    folder = target.parent
    made = check_file_target(path, what)
    tmp = None
    try:
        for d in made:
            d.mkdir()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=folder)
        os.chmod(tmp, _new_file_mode())  # mkstemp's 0600 would hide a config from its other readers
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError):
            raise UserError(f"{what} {path}: cannot write ({e.strerror or type(e).__name__})") from None
        raise
