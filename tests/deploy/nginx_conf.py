"""A reader of nginx configuration files, enough to check deploy/nginx.conf: directives,
blocks, quoted strings and comments (nginx "Beginner's Guide", configuration file structure).
No includes or variables are expanded.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

_TOKEN = re.compile(
    r"""\s*(?:#[^\n]*|"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|([{};])|([^\s{};"']+))"""
)


@dataclass
class Block:
    """One block (`http`, `server`, `location = /x`, ...) or the file's top level: its name and
    arguments, its simple directives in order (name, arguments), its nested blocks, and its
    parent (None at the top level)."""

    name: str
    args: tuple[str, ...] = ()
    directives: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    blocks: list["Block"] = field(default_factory=list)
    parent: "Block | None" = field(default=None, repr=False)

    def find(self, name: str, *args: str) -> list["Block"]:
        """Every block below this one (at any depth) with this name and, if given, these
        arguments."""
        found = [b for b in self.blocks if b.name == name and (not args or b.args == args)]
        for block in self.blocks:
            found += block.find(name, *args)
        return found

    def own(self, name: str) -> list[tuple[str, ...]]:
        """The arguments of every `name` directive written in this block itself."""
        return [args for directive, args in self.directives if directive == name]

    def effective(self, name: str) -> list[tuple[str, ...]]:
        """The `name` directives in force in this block: its own, else those of the nearest
        enclosing block that has any (nginx's inheritance of proxy_*, gzip and most other
        directives, including array ones such as proxy_set_header)."""
        block: Block | None = self
        while block is not None:
            if own := block.own(name):
                return own
            block = block.parent
        return []


def _tokens(text: str) -> Iterator[tuple[str, str]]:
    """("word", text) for each bare or quoted word (quotes removed), ("punct", c) for each
    `{`, `}` and `;`; comments are skipped. Raises ValueError on text that is neither."""
    pos = 0
    while text[pos:].strip():
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"unreadable text at offset {pos}: {text[pos : pos + 20]!r}")
        pos = match.end()
        double, single, punct, bare = match.groups()
        if punct is not None:
            yield "punct", punct
        elif (word := next((w for w in (double, single, bare) if w is not None), None)) is not None:
            yield "word", word


def parse(text: str) -> Block:
    """The configuration as a tree of `Block`s. Raises ValueError on unbalanced braces or a
    directive without its `;`."""
    root = current = Block("main")
    words: list[str] = []
    for kind, value in _tokens(text):
        if kind == "word":
            words.append(value)
            continue
        if value == "}":
            if words or current.parent is None:
                raise ValueError(f"unexpected '}}' after {words!r}")
            current = current.parent
            continue
        if not words:
            raise ValueError(f"{value!r} without a directive name")
        if value == ";":
            current.directives.append((words[0], tuple(words[1:])))
        else:
            block = Block(words[0], tuple(words[1:]), parent=current)
            current.blocks.append(block)
            current = block
        words = []
    if words or current is not root:
        raise ValueError("unterminated directive or block at end of file")
    return root
