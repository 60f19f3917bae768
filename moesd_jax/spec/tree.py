"""Static token trees: the topology and the named trees.

Topology
--------
A tree is a static, hashable tuple of *paths*, vLLM's ``speculative_token_tree``
convention: a path lists child ranks from the root, so ``(0,)`` is the root's top
candidate, ``(1,)`` its second, ``(0, 1)`` the second candidate after ``(0,)``. Node 0 is
the root, the *pending* token (sampled last iteration, not yet run through the target);
the N draft nodes are numbered 1..N in breadth-first order (depth, then path), so every
depth level is a contiguous index range and parents precede children. A chain of K is
``((0,), (0, 0), ..., (0,) * K)``. :class:`TokenTree` derives numpy constants from the
paths: parents, depths (= position offsets), child ranks, children, the ancestor-or-self
mask ``[N+1, N+1]`` and the root-to-leaf paths.

Named trees live in ``configs/spec/tree-*.yaml`` (``paths: [[0], [1], [0, 0], ...]`` or
``widths: [w_1, w_2, ...]``, a full tree where every node at depth d-1 has w_d children);
:func:`load_tree` resolves ``tree-15`` or any YAML path.

Drafting lives with the proposers (``spec/proposers.py``), acceptance in
``spec/sampling.py`` (:func:`~moesd_jax.spec.sampling.rejection_sample_tree`), and the one
draft -> verify -> accept -> commit step that uses both in ``spec/loop.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from moesd_jax.config import ConfigError, resolve_config_path

Paths = tuple[tuple[int, ...], ...]


def _const(x) -> np.ndarray:
    a = np.asarray(x)
    a.setflags(write=False)
    return a


def validate_paths(paths) -> Paths:
    """Checks a list of paths and returns them as a tuple of int tuples in BFS order.

    Raises:
      ConfigError: empty tree, empty/negative path, duplicate path, missing parent, or
        child ranks that are not 0..n-1 under some node.
    """
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise ConfigError(f"tree paths must be a list of lists of ints, got {paths!r}")
    out = []
    for i, p in enumerate(paths):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise ConfigError(f"tree path {i} = {p!r} must be a non-empty list of child "
                              "ranks (the root is implicit)")
        try:
            t = tuple(int(r) for r in p)
        except (TypeError, ValueError):
            raise ConfigError(f"tree path {i} = {p!r} must hold integer ranks") from None
        if any(int(r) != r for r in p) or min(t) < 0:
            raise ConfigError(f"tree path {i} = {list(p)!r} has a negative or non-integer "
                              "rank")
        out.append(t)
    if not out:
        raise ConfigError("a tree needs at least one node")
    seen = set()
    for t in out:
        if t in seen:
            raise ConfigError(f"tree path {list(t)} appears more than once")
        seen.add(t)
    children: dict[tuple[int, ...], list[int]] = {(): []}
    for t in out:
        children.setdefault(t, [])
    for t in out:
        if t[:-1] not in seen and len(t) > 1:
            raise ConfigError(f"tree path {list(t)} has no parent: {list(t[:-1])} is not in "
                              "the tree")
        children[t[:-1]].append(t[-1])
    for parent, ranks in children.items():
        if sorted(ranks) != list(range(len(ranks))):
            missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
            raise ConfigError(f"children of {list(parent) or 'the root'} have ranks "
                              f"{sorted(ranks)}: ranks must be 0..n-1 (missing {missing})")
    return tuple(sorted(out, key=lambda t: (len(t), t)))


def paths_from_widths(widths: Sequence[int]) -> Paths:
    """Full tree: every node at depth d-1 has ``widths[d-1]`` children (root = depth 0).

    ``[1, 1, 1, 1]`` is a chain of 4; ``[3, 2, 1]`` has 3 + 6 + 6 = 15 nodes.
    """
    widths = list(widths)
    if not widths or any(int(w) != w or w < 1 for w in widths):
        raise ConfigError(f"tree widths={widths} must be a non-empty list of ints >= 1")
    level: list[tuple[int, ...]] = [()]
    paths: list[tuple[int, ...]] = []
    for w in widths:
        level = [p + (r,) for p in level for r in range(int(w))]
        paths.extend(level)
    return tuple(paths)


def chain_paths(k: int) -> Paths:
    """A chain of K drafts as a tree."""
    if k < 1:
        raise ConfigError(f"a chain tree needs k >= 1, got {k}")
    return tuple((0,) * d for d in range(1, k + 1))


def paths_from_rank_acceptance(rank_probs: Sequence[float], num_nodes: int,
                               max_depth: int | None = None) -> Paths:
    """The ``num_nodes`` nodes with the highest expected acceptance under a rank model.

    A node's score is the product over its path of ``rank_probs[rank]`` (the probability
    that the draft's rank-r candidate is the accepted one); the best ``num_nodes`` nodes
    (ties broken breadth-first) form a valid tree when ``rank_probs`` is strictly
    decreasing and < 1. This is how Medusa / EAGLE / Sequoia-style static trees are built
    from measured per-rank acceptance rates.
    """
    a = [float(x) for x in rank_probs]
    if not a or any(not 0 < x < 1 for x in a) or any(x <= y for x, y in zip(a, a[1:])):
        raise ConfigError(f"rank_probs={a} must be strictly decreasing values in (0, 1)")
    depth_cap = max_depth or num_nodes
    import heapq

    heap = [(-a[0], (0,))]
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < num_nodes:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        r = path[-1]
        if r + 1 < len(a):  # next sibling
            heapq.heappush(heap, (neg / a[r] * a[r + 1], path[:-1] + (r + 1,)))
        if len(path) < depth_cap:  # first child
            heapq.heappush(heap, (neg * a[0], path + (0,)))
    return validate_paths(chosen)


@dataclasses.dataclass(frozen=True)
class TokenTree:
    """Static tree topology (hashable) and its derived numpy constants.

    Build with ``TokenTree.from_paths(paths)`` (cached); node 0 is the root (pending
    token), nodes 1..N the drafts in breadth-first order.

    Attributes (numpy, read-only):
      parents: int32 [N+1], parent node index (-1 for the root).
      depths: int32 [N+1], depth = position offset from the root.
      ranks: int32 [N+1], child rank under the parent (0 for the root).
      num_children: int32 [N+1].
      children: int32 [N+1, W] child node indices by rank, 0-padded (W = max children).
      ancestor_mask: bool [N+1, N+1], ``[i, j]`` = j is an ancestor of i or i itself.
      leaf_paths: int32 [num_leaves, D+1], root-to-leaf node indices, -1 padded.
      level_start: int32 [D+2], nodes of depth d are ``level_start[d]:level_start[d+1]``.
    """

    paths: Paths
    parents: np.ndarray = dataclasses.field(init=False, compare=False, hash=False, repr=False)
    depths: np.ndarray = dataclasses.field(init=False, compare=False, hash=False, repr=False)
    ranks: np.ndarray = dataclasses.field(init=False, compare=False, hash=False, repr=False)
    num_children: np.ndarray = dataclasses.field(init=False, compare=False, hash=False,
                                                 repr=False)
    children: np.ndarray = dataclasses.field(init=False, compare=False, hash=False,
                                             repr=False)
    ancestor_mask: np.ndarray = dataclasses.field(init=False, compare=False, hash=False,
                                                  repr=False)
    leaf_paths: np.ndarray = dataclasses.field(init=False, compare=False, hash=False,
                                               repr=False)
    level_start: np.ndarray = dataclasses.field(init=False, compare=False, hash=False,
                                                repr=False)

    def __post_init__(self):
        paths = validate_paths(self.paths)
        object.__setattr__(self, "paths", paths)
        n = len(paths)
        index = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
        parents = np.full(n + 1, -1, np.int32)
        depths = np.zeros(n + 1, np.int32)
        ranks = np.zeros(n + 1, np.int32)
        nch = np.zeros(n + 1, np.int32)
        for p, i in index.items():
            if i:
                parents[i] = index[p[:-1]]
                depths[i] = len(p)
                ranks[i] = p[-1]
                nch[parents[i]] += 1
        w = int(nch.max())
        children = np.zeros((n + 1, w), np.int32)
        for i in range(1, n + 1):
            children[parents[i], ranks[i]] = i
        anc = np.zeros((n + 1, n + 1), bool)
        for i in range(n + 1):
            j = i
            while j >= 0:
                anc[i, j] = True
                j = parents[j]
        d = int(depths.max())
        leaves = [i for i in range(n + 1) if nch[i] == 0]
        leaf_paths = np.full((len(leaves), d + 1), -1, np.int32)
        for r, leaf in enumerate(leaves):
            chain = np.flatnonzero(anc[leaf])  # ancestors in BFS order = root first
            leaf_paths[r, : len(chain)] = chain
        level_start = np.searchsorted(depths, np.arange(d + 2)).astype(np.int32)
        for name, val in [("parents", parents), ("depths", depths), ("ranks", ranks),
                          ("num_children", nch), ("children", children),
                          ("ancestor_mask", anc), ("leaf_paths", leaf_paths),
                          ("level_start", level_start)]:
            object.__setattr__(self, name, _const(val))

    @staticmethod
    def from_paths(paths) -> TokenTree:
        """The (cached) tree of ``paths``, any order, lists or tuples."""
        try:
            key = tuple(tuple(int(r) for r in p) for p in paths)
        except (TypeError, ValueError):
            return TokenTree(paths)  # validate_paths raises a clear error
        return _cached_tree(key)

    @property
    def num_nodes(self) -> int:
        """N draft nodes (the root excluded)."""
        return len(self.paths)

    @property
    def depth(self) -> int:
        """D, the longest root-to-leaf path (max tokens accepted per iteration)."""
        return int(self.depths.max())

    @property
    def is_chain(self) -> bool:
        return self.paths == chain_paths(self.num_nodes)

    def nodes_at(self, d: int) -> np.ndarray:
        return np.arange(self.level_start[d], self.level_start[d + 1], dtype=np.int32)

    def feed_prefix(self, d: int) -> int:
        """The last node of depth d that has children (BFS index); the draft's level
        forwards feed nodes 1..feed_prefix(D-1), every node that has children."""
        nodes = [i for i in self.nodes_at(d) if self.num_children[i] > 0]
        return int(max(nodes))


@functools.lru_cache(maxsize=64)
def _cached_tree(paths: Paths) -> TokenTree:
    return TokenTree(paths)


def load_tree(name_or_path: str | Path | Sequence | TokenTree) -> TokenTree:
    """``tree-15`` -> ``configs/spec/tree-15.yaml``; a YAML path; a TokenTree or paths.

    A YAML tree holds ``paths: [[0], [1], [0, 0], ...]`` or ``widths: [...]``.
    """
    if isinstance(name_or_path, TokenTree):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)):
        return TokenTree.from_paths(validate_paths(name_or_path))
    path = resolve_config_path(name_or_path, "spec")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or ("paths" in data) == ("widths" in data):
        raise ConfigError(f"{path}: a tree file needs exactly one of 'paths' or 'widths'")
    unknown = set(data) - {"paths", "widths", "name", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (expected paths or "
                          "widths)")
    try:
        paths = (validate_paths(data["paths"]) if "paths" in data
                 else paths_from_widths(data["widths"]))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return TokenTree.from_paths(paths)
