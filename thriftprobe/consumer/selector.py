"""Selector: which of a service's nodes one client may call, by version, group and tags.

``build_client(..., version=..., group=..., tags=...)`` builds one. The forms:

- ``version``: ``"*"`` (the default) matches any version, a node without one included;
  ``"1.4.2"`` only exactly that; ``"1.*"`` / ``"1.4.*"`` any version whose dotted parts begin so
  (``"1.*"`` takes ``1``, ``1.0`` and ``1.9.3``, not ``10.1``); a range of comparisons joined by
  commas, each one of ``>= > <= < == !=`` and a version: ``">=1.2,<2"``. A range compares the
  dotted parts as numbers where both are digits and as text otherwise, missing parts as 0
  (``1.2 == 1.2.0 < 1.10``, so ``"<=2"`` takes ``2.0``); a node without a version (``""``)
  matches no range.
- ``group``: ``""`` (the default) matches only nodes that declare no group, as in Dubbo, so a
  group is a partition that consumers opt into; ``"blue"`` only that group; ``"*"`` any; a
  list or tuple: any of its groups (``("blue", "green")`` for blue/green, where weights move
  the traffic between them).
- ``tags``: a mapping that every node must match: each name must be among the node's tags with
  that value, or with any value where the value given is ``"*"``. None (the default): no check.

Nodes that old providers registered without these keys read as version ``""``, group ``""`` and
no tags. Selectors are immutable and may be shared between threads.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Callable, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import InvalidArgument
from ..node import Node

__all__ = ["ANY", "Selector"]

ANY = "*"
_VERSION_RE = re.compile(r"[\w.\-+]{1,64}")
_COMPARISON_RE = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*([\w.\-+]{1,64})\s*")
_OPERATORS: Mapping[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
}

GroupSpec = Union[str, Sequence[str]]


def _version_key(version: str) -> Tuple[Tuple[int, Union[int, str]], ...]:
    """A sort key of a dotted version: numeric parts as numbers, the others as text (numbers
    first), trailing zero parts dropped, so that ``1.2 < 1.10`` and ``2 == 2.0 == 2.0.0``."""
    parts = [(0, int(part)) if part.isdigit() and part.isascii() else (1, part) for part in version.split(".")]
    while len(parts) > 1 and parts[-1] == (0, 0):
        parts.pop()
    return tuple(parts)


class Selector:
    """Whether a node matches a client's version, group and tags (see the module docstring)."""

    __slots__ = ("_groups", "_tags", "_version_test", "group", "tags", "version")

    def __init__(
        self, version: Optional[str] = ANY, group: Optional[GroupSpec] = "", tags: Optional[Mapping[str, str]] = None
    ) -> None:
        self.version = ANY if version is None else version
        self._version_test = _version_test(self.version)
        self.group = ANY if group is None else group
        self._groups = _groups(self.group)
        self.tags = dict(_check_tags(tags))
        self._tags = tuple(self.tags.items())

    @property
    def matches_all(self) -> bool:
        """True when every node matches (no version, group or tag condition)."""
        return self._version_test is None and self._groups is None and not self._tags

    def __call__(self, node: Node) -> bool:
        test = self._version_test
        if test is not None and not test(node.version):
            return False
        groups = self._groups
        if groups is not None and node.group not in groups:
            return False
        if self._tags:
            have = node.tags
            for key, want in self._tags:
                value = have.get(key)
                if value is None or (want != ANY and value != want):
                    return False
        return True

    def why_not(self, node: Node) -> str:
        """Why ``node`` does not match (for ``explain()``); "" when it does."""
        if self._version_test is not None and not self._version_test(node.version):
            return "version %r does not match %r" % (node.version, self.version)
        if self._groups is not None and node.group not in self._groups:
            return "group %r is not %s" % (node.group, _describe_groups(self.group))
        have = node.tags
        for key, want in self._tags:
            if key not in have:
                return "has no tag %r" % key
            if want != ANY and have[key] != want:
                return "tag %s=%r is not %r" % (key, have[key], want)
        return ""

    def describe(self) -> str:
        """A short text of the selection, e.g. ``version 1.*, group blue, tags zone=eu``."""
        parts = []
        if self._version_test is not None:
            parts.append("version %s" % self.version)
        if self._groups is not None:
            parts.append("group %s" % _describe_groups(self.group))
        if self._tags:
            parts.append("tags " + ",".join("%s=%s" % pair for pair in self._tags))
        return ", ".join(parts) or "any node"

    def __repr__(self) -> str:
        return "Selector(version=%r, group=%r, tags=%r)" % (self.version, self.group, self.tags)


def _describe_groups(group: GroupSpec) -> str:
    if isinstance(group, str):
        return repr(group) if group else "'' (no group)"
    return "one of " + ", ".join(repr(g) for g in group)


def _version_test(spec: object) -> Optional[Callable[[str], bool]]:
    if not isinstance(spec, str):
        raise InvalidArgument("version must be a string, got %r" % (spec,))
    if spec == ANY:
        return None
    if spec.endswith(".*") and _VERSION_RE.fullmatch(spec[:-2]):
        prefix = spec[:-2] + "."
        exact = spec[:-2]
        return lambda version: version == exact or version.startswith(prefix)
    if _VERSION_RE.fullmatch(spec):
        return lambda version: version == spec
    checks: List[Tuple[Callable[[Any, Any], bool], Tuple[Tuple[int, Union[int, str]], ...]]] = []
    for part in spec.split(","):
        found = _COMPARISON_RE.fullmatch(part)
        if found is None:
            raise InvalidArgument(
                "version %r is invalid: give an exact version ('1.4.2'), '*', a prefix ('1.*', '1.4.*') or a "
                "range of comparisons joined by commas ('>=1.2,<2')" % (spec,)
            )
        checks.append((_OPERATORS[found.group(1)], _version_key(found.group(2))))
    frozen = tuple(checks)

    def in_range(version: str) -> bool:
        if not version:
            return False
        key = _version_key(version)
        return all(compare(key, bound) for compare, bound in frozen)

    return in_range


def _groups(spec: object) -> Optional[FrozenSet[str]]:
    if isinstance(spec, str):
        if spec == ANY:
            return None
        _check_group(spec)
        return frozenset((spec,))
    if isinstance(spec, (list, tuple, set, frozenset)) and spec:
        for group in spec:
            if group == ANY:
                return None
            _check_group(group)
        return frozenset(spec)
    raise InvalidArgument("group must be a string, '*' or a non-empty list of groups, got %r" % (spec,))


def _check_group(group: object) -> None:
    if not isinstance(group, str) or (group and not _VERSION_RE.fullmatch(group)):
        raise InvalidArgument(
            "group %r is invalid: it must be at most 64 letters, digits, '.', '-', '+' and '_'" % (group,)
        )


def _check_tags(tags: object) -> Mapping[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise InvalidArgument("tags must be a mapping of names to values, got %r" % (tags,))
    for key, value in tags.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise InvalidArgument("tags must map names to strings ('*' for any value), got %r: %r" % (key, value))
    return tags
