"""Comparing two trees of arrays by leaf name and shape (plain Python, no JAX).

The converters and the checkpointer each refuse a tree that is not the one they expect, and
name what differs. Both sides are flat {leaf name: shape} dicts:

    diff = leaf_diff(expected, got)     # names missing from got, unexpected in it, misshapen
    leaf_problems(expected, got)        # the same as sorted lines, e.g. "wpe: shape (15, 32),
                                        # expected (16, 32)"
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence


class LeafDiff(NamedTuple):
  """Leaf names, each list sorted: in `expected` only, in `got` only, and with other shapes."""

  missing: list[str]
  unexpected: list[str]
  misshapen: list[str]


def leaf_diff(expected: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]]) -> LeafDiff:
  """Every leaf where `got` differs from `expected` ({name: shape} both), sorted by name."""
  return LeafDiff(sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys()),
                  sorted(k for k in expected.keys() & got.keys()
                         if tuple(got[k]) != tuple(expected[k])))


def leaf_problems(expected: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]], *,
                  missing: str = "missing", unexpected: str = "unexpected",
                  misshapen: str = "shape {got}, expected {expected}") -> list[str]:
  """One sorted line "NAME: what" per leaf `leaf_diff` names; [] when the trees agree.

  The keywords word each kind of line; `misshapen` is formatted with the two shapes.
  """
  diff = leaf_diff(expected, got)
  return sorted([f"{k}: {missing}" for k in diff.missing]
                + [f"{k}: {unexpected}" for k in diff.unexpected]
                + [f"{k}: " + misshapen.format(got=got[k], expected=expected[k])
                   for k in diff.misshapen])
