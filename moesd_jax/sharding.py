"""Meshes and logical-axis sharding rules.

Model code names tensor dimensions with *logical* axes (``param(..., axes=("expert",
"embed", "expert_mlp"))``); a sharding strategy (``configs/mesh/<name>.yaml``, a
:class:`~moesd_jax.config.MeshConfig`) builds a device mesh and maps each logical axis to
mesh axes. Logical axes: ``vocab embed mlp heads kv_heads head_dim norm expert
expert_router expert_mlp`` (parameters) and ``batch`` (decode rows: KV cache, tokens).
A logical axis with no rule is replicated; a mesh axis already used by an earlier dimension
of the same tensor is not used again (MaxText's rule).

:class:`ShardingPlan` (mesh + normalised rules) is the one object the rest of the library
passes around, explicitly::

    plan = ShardingPlan.load("ep")                       # configs/mesh/ep.yaml, all devices
    model = plan.shard_model(model)                      # a copy placed per the rules
    dec = SpecDecoder(target, draft, spec, mesh=plan)    # LoopConfig.plan = plan
    with plan.activate():                                # the mesh (jax.set_mesh)
        logits = jax.jit(functools.partial(apply, plan=plan))(graphdef, state, ...)

Expert parallelism: a model call given a plan whose ``expert`` rule spans mesh axes of
total size > 1 routes each MoE layer's dispatch through ``models/ep.py``'s
``ep_dispatch`` (``all_to_all`` to the devices owning each token's experts, the
configured backend on the local experts, ``all_to_all`` back). The plan is an argument
(static: a field of ``LoopConfig``, compared by identity), never a context variable
read at trace time, so a jitted function's cache key always includes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moesd_jax.config import ConfigError, MeshConfig, ModelConfig, load_config
from moesd_jax.kv_cache import KVCache

LOGICAL_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "expert",
                "expert_router", "expert_mlp", "batch")

Rules = dict[str, tuple[str, ...]]


# ---------------------------------------------------------------------------------------
# mesh and rules


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with ``Auto`` axes shaped by ``cfg.axes``.

    Args:
      cfg: the strategy; one axis size may be -1 (= the devices left over).
      devices: devices to lay out, in order. None: every device (``jax.devices()``, all
        processes) when an axis is -1; with all sizes fixed, the first prod(sizes) devices
        (so ``single`` uses one device of a multi-device host).

    Raises:
      ConfigError: the sizes do not fit the device count (naming both).
    """
    cfg.validate()
    names = tuple(cfg.axes)
    sizes = [int(v) for v in cfg.axes.values()]
    fixed = math.prod(s for s in sizes if s != -1)
    if devices is None:
        devices = jax.devices()
        if -1 not in sizes and fixed < len(devices) and jax.process_count() == 1:
            devices = devices[:fixed]
    devices = list(devices)
    n = len(devices)
    if -1 in sizes:
        if n % fixed:
            raise ConfigError(f"mesh.axes={dict(cfg.axes)}: {n} devices are not divisible by "
                              f"the fixed axes' product {fixed}")
        sizes[sizes.index(-1)] = n // fixed
    if math.prod(sizes) != n:
        raise ConfigError(f"mesh.axes={dict(cfg.axes)} needs {math.prod(sizes)} devices but "
                          f"{n} are given")
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names,
                axis_types=(AxisType.Auto,) * len(names))


def normalize_rules(rules: Mapping[str, Any], mesh_axes: Sequence[str]) -> Rules:
    """``{logical: str | list | None}`` -> ``{logical: tuple of mesh axes}``, validated."""
    out: Rules = {}
    for name, target in rules.items():
        if name not in LOGICAL_AXES:
            raise ConfigError(f"mesh.rules.{name}: unknown logical axis (known: "
                              f"{list(LOGICAL_AXES)})")
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for a in axes:
            if a not in mesh_axes:
                raise ConfigError(f"mesh.rules.{name}={target!r}: mesh axis {a!r} is not in "
                                  f"mesh.axes {list(mesh_axes)}")
        if len(set(axes)) != len(axes):
            raise ConfigError(f"mesh.rules.{name}={target!r} repeats a mesh axis")
        out[name] = axes
    if set(out.get("expert", ())) & set(out.get("expert_mlp", ())):
        raise ConfigError(f"mesh.rules: expert={list(out['expert'])} and expert_mlp="
                          f"{list(out['expert_mlp'])} share a mesh axis")
    return out


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> P:
    """PartitionSpec of a tensor whose dimensions carry ``logical_axes``."""
    used: set[str] = set()
    entries: list[Any] = []
    for name in logical_axes:
        axes = tuple(a for a in rules.get(name, ()) if a not in used) if name else ()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def spec_to_json(spec: P) -> list[Any]:
    """PartitionSpec -> list of None | axis | [axes] (trailing Nones kept)."""
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def _spec_axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


@dataclasses.dataclass(frozen=True, eq=False)
class ShardingPlan:
    """A mesh and the normalised logical -> mesh-axis rules of one strategy.

    Attributes:
      mesh: the device mesh (Auto axes).
      rules: logical axis -> tuple of mesh axes (missing or empty = replicated).
      name: strategy name (for messages).
    """

    mesh: Mesh
    rules: Rules
    name: str = ""

    @classmethod
    def from_config(cls, cfg: MeshConfig, devices: Sequence[jax.Device] | None = None,
                    name: str = "") -> ShardingPlan:
        mesh = make_mesh(cfg, devices)
        return cls(mesh, normalize_rules(cfg.rules, mesh.axis_names), name)

    @classmethod
    def load(cls, name_or_path: str | Path, overrides: list[str] | None = None,
             devices: Sequence[jax.Device] | None = None) -> ShardingPlan:
        """``ShardingPlan.load("ep")`` reads ``configs/mesh/ep.yaml``."""
        cfg = load_config(MeshConfig, name_or_path, overrides, kind="mesh")
        return cls.from_config(cfg, devices, name=Path(str(name_or_path)).stem)

    # -- sizes and specs ----------------------------------------------------------------
    def axes(self, logical: str) -> tuple[str, ...]:
        return self.rules.get(logical, ())

    def size(self, logical: str) -> int:
        """Number of shards of logical axis ``logical`` (product of its mesh axes)."""
        return math.prod(self.mesh.shape[a] for a in self.axes(logical))

    def spec(self, logical_axes: Sequence[str | None]) -> P:
        return logical_to_spec(logical_axes, self.rules)

    def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))

    @property
    def expert_parallel(self) -> bool:
        return self.size("expert") > 1

    def _check_dims(self, what: str, shape: Sequence[int], spec: P,
                    logical: Sequence[str | None]) -> None:
        for dim, entry, name in zip(shape, spec, logical):
            axes = _spec_axes(entry)
            n = math.prod(self.mesh.shape[a] for a in axes)
            if dim % n:
                raise ConfigError(
                    f"{self.name or 'mesh'}: {what} dimension {name!r} of size {dim} is not "
                    f"divisible by mesh axis {'x'.join(axes)} of size {n} (shape "
                    f"{tuple(shape)}, spec {spec})")

    # -- validation ---------------------------------------------------------------------
    def validate_model(self, cfg: ModelConfig, prefix: str = "model") -> None:
        """Raises ConfigError naming the field and mesh axis when a dimension cannot split."""
        checks = [("heads", cfg.num_heads, "num_heads"),
                  ("kv_heads", cfg.num_kv_heads, "num_kv_heads")]
        if cfg.moe is not None:
            checks += [("expert", cfg.moe.num_experts, "moe.num_experts"),
                       ("expert_mlp", cfg.moe.expert_dim, "moe.expert_dim")]
        for logical, value, field in checks:
            n = self.size(logical)
            if value % n:
                raise ConfigError(
                    f"{prefix}.{field}={value} is not divisible by mesh axis "
                    f"{'x'.join(self.axes(logical))}={n} (rule {logical} -> "
                    f"{list(self.axes(logical))} in strategy {self.name or '?'})")

    def validate_batch(self, batch: int) -> None:
        """Raises ConfigError unless the ``batch`` rule's mesh axes divide ``batch``.

        ``SpecDecoder`` and the serving engine never hit this: they pad such batches with
        inert rows (``spec.decoder.pad_rows``) first; it guards direct ``shard_batch``
        calls."""
        n = self.size("batch")
        if batch % n:
            raise ConfigError(
                f"batch={batch} is not divisible by mesh axis {'x'.join(self.axes('batch'))}"
                f"={n} (rule batch -> {list(self.axes('batch'))} in strategy "
                f"{self.name or '?'}); pad it to a multiple of {n} rows "
                "(spec.decoder.pad_rows)")

    # -- parameters ---------------------------------------------------------------------
    def param_specs(self, state: nnx.State) -> dict[str, P]:
        """``{"layers/0/moe/w_up_EDF": PartitionSpec(...)}`` for every Variable in state."""
        flat = jax.tree.leaves_with_path(state, is_leaf=_is_var)
        return {_path(p): self.spec(_logical(v)) for p, v in flat}

    def describe(self, state: nnx.State) -> dict[str, Any]:
        """JSON-able snapshot: mesh shape, per-parameter and cache PartitionSpecs."""
        specs = self.param_specs(state)
        return {"strategy": self.name, "mesh": dict(self.mesh.shape),
                "params": {k: spec_to_json(v) for k, v in sorted(specs.items())},
                "kv_cache": spec_to_json(self.spec((None, "batch", None, "kv_heads", None)))}

    def param_shardings(self, state: nnx.State) -> nnx.State:
        """NamedSharding per parameter (same tree as ``state``; checks divisibility).

        ``state`` may be abstract (``nnx.eval_shape``); the result can be passed to
        ``checkpoint.load_model(shardings=...)`` to restore straight into the layout.
        """

        def one(path, v):
            logical = _logical(v)
            spec = self.spec(logical)
            self._check_dims(f"parameter {_path(path)}", v.shape, spec, logical)
            return NamedSharding(self.mesh, spec)

        return jax.tree.map_with_path(one, state, is_leaf=_is_var)

    def shard_model(self, model: nnx.Module) -> nnx.Module:
        """A copy of ``model`` with its parameters placed per the rules (checked first).

        The input model is left untouched (its arrays stay where they are).
        """
        cfg = getattr(model, "cfg", None)
        if isinstance(cfg, ModelConfig):
            self.validate_model(cfg)
        graphdef, state = nnx.split(model)
        shardings = self.param_shardings(state)
        placed = jax.tree.map(lambda v, s: v.replace(put_global(v[...], s)), state, shardings,
                              is_leaf=_is_var)
        return nnx.merge(graphdef, placed)

    # -- caches, decode rows ------------------------------------------------------------
    def cache_shardings(self) -> KVCache:
        """KVCache of NamedShardings: k/v ``[L, B, S, G, Dh]`` over (batch, kv_heads)."""
        kv = self.sharding((None, "batch", None, "kv_heads", None))
        return KVCache(kv, kv, self.sharding(("batch",)))

    def shard_cache(self, cache: KVCache) -> KVCache:
        return jax.tree.map(put_global, cache, self.cache_shardings())

    def constrain_cache(self, cache: KVCache | None) -> KVCache | None:
        """``with_sharding_constraint`` of a cache inside jit (None passes through)."""
        if cache is None:
            return None
        return jax.tree.map(jax.lax.with_sharding_constraint, cache, self.cache_shardings())

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Rows over the ``batch`` rule, other dimensions replicated."""
        return self.sharding(("batch",) + (None,) * (ndim - 1))

    def shard_batch(self, *arrays: Any) -> tuple[jax.Array, ...]:
        """Host arrays with leading dim B -> global arrays split over ``batch`` (checked)."""
        out = []
        for a in arrays:
            a = np.asarray(a)
            if a.ndim:
                self.validate_batch(a.shape[0])
            out.append(put_global(a, self.batch_sharding(a.ndim) if a.ndim else
                                  NamedSharding(self.mesh, P())))
        return tuple(out)

    # -- context ------------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self) -> Iterator[ShardingPlan]:
        """Sets this plan's mesh as JAX's current mesh (``jax.set_mesh``). The plan itself
        reaches the model explicitly (``Transformer.__call__(..., plan=)``,
        ``LoopConfig.plan``), never through global state, so it is part of every jit
        cache key."""
        with jax.set_mesh(self.mesh):
            yield self


def _logical(v: nnx.Variable) -> tuple[str | None, ...]:
    axes = v.get_metadata().get("logical_axes")
    if axes is None:
        return (None,) * len(v.shape)
    if len(axes) != len(v.shape):
        raise ValueError(f"logical_axes {axes} do not match shape {v.shape}")
    return tuple(axes)


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Places a value (identical on every process) as a global array with ``sharding``.

    One process: ``jax.device_put``. Several: each process builds its addressable shards
    from its own copy (``make_array_from_callback``), so no data crosses hosts.
    """
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


# module-level spellings of the plan's methods ------------------------------------------


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Mapping[str, Any]):
    """NamedSharding per parameter of ``abstract_state`` under ``rules`` on ``mesh``."""
    return ShardingPlan(mesh, normalize_rules(rules, mesh.axis_names)).param_shardings(
        abstract_state)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, Any]) -> nnx.Module:
    """A copy of ``model`` with its parameters placed on ``mesh`` per ``rules``."""
    return ShardingPlan(mesh, normalize_rules(rules, mesh.axis_names)).shard_model(model)


def use_mesh(mesh: Mesh, rules: Mapping[str, Any]):
    """Context manager: ``with use_mesh(mesh, rules): ...`` = ``plan.activate()``."""
    return ShardingPlan(mesh, normalize_rules(rules, mesh.axis_names)).activate()


def as_plan(mesh: ShardingPlan | str | MeshConfig | None) -> ShardingPlan | None:
    """A plan from a plan, a strategy name / YAML path, or a MeshConfig (None passes)."""
    if mesh is None or isinstance(mesh, ShardingPlan):
        return mesh
    if isinstance(mesh, MeshConfig):
        return ShardingPlan.from_config(mesh)
    return ShardingPlan.load(mesh)


