"""Typed, frozen configuration for models, MoE, meshes, speculation and serving.

Every config is a frozen dataclass. YAML files in ``configs/`` map onto them with
:func:`load_config`; ``key.sub=value`` overrides (as given on a command line) are applied
on top. Unknown keys and impossible values raise :class:`ConfigError` naming the key and
the value, e.g. ``moe.top_k=9 must be <= moe.num_experts=8``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

REPO_CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped in the wheel

Dispatch = Literal["dense", "gather", "ragged", "pallas", "dense_budgeted", "gather_budgeted",
                   "ragged_budgeted", "pallas_budgeted"]
QKNorm = Literal["none", "head", "all"]


class ConfigError(ValueError):
    """A configuration key is unknown or its value is impossible."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts feed-forward block.

    Attributes:
      num_experts: E, routed experts per MoE layer.
      top_k: K, experts per token.
      expert_dim: F, ffn width of each routed expert.
      norm_topk_prob: renormalise the top-k softmax probabilities to sum to 1 (Mixtral,
        Qwen3-MoE: yes; OLMoE, Qwen2-MoE: no by default).
      shared_expert_dim: ffn width of the always-on shared expert; 0 = none.
      shared_expert_gate: scale the shared expert by sigmoid(x @ w_gate) (Qwen2-MoE).
      dispatch: backend computing the routed experts (DESIGN.md): ``dense`` (float32
        reference, every expert on every token), ``gather`` (only active experts' weights
        are read; CPU default), ``ragged`` (``lax.ragged_dot``), ``pallas`` (kernel).
        ``<backend>_budgeted`` applies the verification-time expert budget in front of
        the backend; prefill always runs unbudgeted.
      budget: B, experts kept per layer per verification step (top-B by routing mass
        over the step's draft tokens; each row's root token keeps its own experts).
      budget_policy: how draft tokens are routed given the kept experts: ``prune``
        (lossless: tokens are never rerouted; a draft token that loses an expert is
        dropped, and the spec loop prunes it and its descendants), ``substitute``
        (MoE-Spec, lossy: draft tokens re-pick their top-k among the kept experts) or
        ``truncate`` (lossy: draft tokens keep only their kept natural experts).
        Users set these through ``SpecConfig.budget`` (``spec/budget.py``).
      budget_mass: None keeps the top-B experts by routing mass; a fraction f in (0, 1]
        keeps experts in mass order until their mass reaches f of the total (at least
        top_k, at most B).
      max_active: static cap A on distinct experts per layer per step for ``gather``;
        None = min(E, tokens * K), which never drops an expert.
      sparse_step: layer i is MoE iff (i + 1) % sparse_step == 0 (Qwen2-MoE's
        ``decoder_sparse_step``), and i is not in ``dense_layers``.
      dense_layers: layers that use a dense MLP of ``ModelConfig.mlp_dim`` instead.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_dim: int = 64
    norm_topk_prob: bool = True
    shared_expert_dim: int = 0
    shared_expert_gate: bool = False
    dispatch: Dispatch = "gather"
    max_active: int | None = None
    budget: int | None = None
    budget_policy: Literal["prune", "substitute", "truncate"] = "prune"
    budget_mass: float | None = None
    sparse_step: int = 1
    dense_layers: tuple[int, ...] = ()

    def validate(self, prefix: str = "moe") -> None:
        _positive(self, prefix, "num_experts", "top_k", "expert_dim", "sparse_step")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"{prefix}.top_k={self.top_k} must be <= {prefix}.num_experts={self.num_experts}"
            )
        if self.shared_expert_dim < 0:
            raise ConfigError(f"{prefix}.shared_expert_dim={self.shared_expert_dim} must be >= 0")
        if self.dispatch.endswith("_budgeted") and self.budget is None:
            raise ConfigError(f"{prefix}.dispatch={self.dispatch!r} needs {prefix}.budget")
        if self.budget is not None and not self.top_k <= self.budget <= self.num_experts:
            raise ConfigError(f"{prefix}.budget={self.budget} must be in [{prefix}.top_k="
                              f"{self.top_k}, {prefix}.num_experts={self.num_experts}]")
        if self.budget_policy not in ("prune", "substitute", "truncate"):
            raise ConfigError(f"{prefix}.budget_policy={self.budget_policy!r} must be prune, "
                              "substitute or truncate")
        if self.budget_mass is not None and not 0.0 < self.budget_mass <= 1.0:
            raise ConfigError(f"{prefix}.budget_mass={self.budget_mass} must be in (0, 1]")
        if self.max_active is not None and not 1 <= self.max_active <= self.num_experts:
            raise ConfigError(
                f"{prefix}.max_active={self.max_active} must be in [1, {prefix}.num_experts="
                f"{self.num_experts}]"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer, dense or MoE.

    Attributes:
      arch: informational name (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``,
        ``llama``, ``qwen2``, ``qwen3``, ``moesd``).
      vocab_size: V. d_model: D. num_layers: L. num_heads: H. num_kv_heads: G.
      head_dim: per-head width; None = d_model // num_heads.
      mlp_dim: ffn width of dense MLP layers (all layers of a dense model).
      rope_theta: RoPE base, as HF's ``rope_theta``.
      rms_eps: RMSNorm epsilon.
      qk_norm: ``none``; ``head`` (RMSNorm over head_dim, Qwen3); ``all`` (over all
        heads' concatenated q and k, OLMoE).
      qkv_bias: biases on the q/k/v projections (Qwen2).
      clip_qkv: clamp q, k, v to [-c, c] after projection (OLMoE option).
      tie_embeddings: LM head shares the embedding matrix.
      max_seq_len: default KV cache capacity S.
      param_dtype: dtype parameters are stored in. compute_dtype: dtype of matmuls
        (float32 on CPU: bf16 skinny dots are ~15x slower there, see DESIGN.md).
      moe: the MoE block, or None for a dense model.
      eos_token_ids: token ids that end generation.
    """

    arch: str = "moesd"
    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    mlp_dim: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    qk_norm: QKNorm = "none"
    qkv_bias: bool = False
    clip_qkv: float | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 512
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    moe: MoEConfig | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def dh(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    def is_moe_layer(self, i: int) -> bool:
        m = self.moe
        return m is not None and (i + 1) % m.sparse_step == 0 and i not in m.dense_layers

    def validate(self, prefix: str = "model") -> None:
        _positive(self, prefix, "vocab_size", "d_model", "num_layers", "num_heads",
                  "num_kv_heads", "mlp_dim", "max_seq_len")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{prefix}.num_heads={self.num_heads} is not divisible by "
                f"{prefix}.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(
                f"{prefix}.d_model={self.d_model} is not divisible by "
                f"{prefix}.num_heads={self.num_heads} (set {prefix}.head_dim)"
            )
        if self.dh % 2:
            raise ConfigError(f"{prefix}.head_dim={self.dh} must be even for RoPE")
        for name in ("param_dtype", "compute_dtype"):
            v = getattr(self, name)
            if v not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{prefix}.{name}={v!r} must be float32, bfloat16 or float16")
        if self.rope_theta <= 0:
            raise ConfigError(f"{prefix}.rope_theta={self.rope_theta} must be > 0")
        if self.moe is not None:
            self.moe.validate(f"{prefix}.moe")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """A device mesh and the logical-axis -> mesh-axis rules of one sharding strategy.

    Attributes:
      axes: mesh axis names -> sizes; one size may be -1 (= the remaining devices).
      rules: logical axis name -> mesh axis (or list of mesh axes, or None = replicated).
      description: what the strategy is for.
    """

    axes: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": -1})
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""

    def validate(self, prefix: str = "mesh") -> None:
        if sum(1 for v in self.axes.values() if v == -1) > 1:
            raise ConfigError(f"{prefix}.axes={self.axes}: at most one axis may be -1")
        for k, v in self.axes.items():
            if v != -1 and v < 1:
                raise ConfigError(f"{prefix}.axes.{k}={v} must be >= 1 or -1")


BUDGET_POLICIES = ("none", "moe_spec", "mass", "lossless")


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """A verification-time expert budget (DESIGN.md "Expert budgeting", ``spec/budget.py``).

    Attributes:
      policy: ``none``; ``moe_spec`` (MoE-Spec, lossy: per layer keep the top-B experts
        by routing mass over the verified tokens, draft tokens re-pick their top-k among
        them); ``mass`` (lossy: keep experts in mass order until ``mass`` of the total
        routing mass is covered, at most B, then as ``moe_spec``); ``lossless`` (keep the
        top-B by mass but never reroute: draft nodes that lose an expert are pruned with
        their descendants; the output distribution is exactly the target's).
      b: B, experts kept per MoE layer per verification forward (the root token's own
        top-k come on top). Required for ``moe_spec`` and ``lossless``; None with
        ``mass`` = no cap (E). Must lie in [top_k, E] of the target.
      truncate: ``moe_spec``/``mass`` only: draft tokens drop their non-kept experts
        instead of re-picking among the kept ones.
      mass: ``mass`` only: the fraction of routing mass to cover, in (0, 1].
      min_agreement: quality gate (``--budget-min-agreement``): before serving, measure
        the token agreement of budgeted greedy output with unbudgeted greedy output on a
        calibration prompt set and, while it is below this, double B (up to E), then fall
        back to ``lossless`` (``spec.budget.calibrate``). None = no gate.
    """

    policy: Literal["none", "moe_spec", "mass", "lossless"] = "none"
    b: int | None = None
    truncate: bool = False
    mass: float = 0.9
    min_agreement: float | None = None

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def validate(self, prefix: str = "budget") -> None:
        if self.policy not in BUDGET_POLICIES:
            raise ConfigError(f"{prefix}.policy={self.policy!r} must be one of "
                              f"{list(BUDGET_POLICIES)}")
        if self.b is not None and (isinstance(self.b, bool) or not isinstance(self.b, int)
                                   or self.b < 1):
            raise ConfigError(f"{prefix}.b={self.b!r} must be a positive integer")
        if self.policy in ("moe_spec", "lossless") and self.b is None:
            raise ConfigError(f"{prefix}.policy={self.policy!r} needs {prefix}.b")
        if not 0.0 < self.mass <= 1.0:
            raise ConfigError(f"{prefix}.mass={self.mass} must be in (0, 1]")
        if self.truncate and self.policy not in ("moe_spec", "mass"):
            raise ConfigError(f"{prefix}.truncate goes with policy moe_spec or mass, not "
                              f"{self.policy!r}")
        if self.min_agreement is not None:
            if not 0.0 <= self.min_agreement <= 1.0:
                raise ConfigError(f"{prefix}.min_agreement={self.min_agreement} must be in "
                                  "[0, 1]")
            if self.policy == "none":
                raise ConfigError(f"{prefix}.min_agreement needs a budget policy")


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding.

    Attributes:
      method: ``none`` (plain autoregressive), ``draft`` (draft model), ``ngram``
        (prompt lookup), ``eagle`` (an EAGLE-3 head, ``spec/eagle.py``), ``oracle``
        (benchmarks only: proposes the target's own greedy continuation, given as a
        reference, each position kept with probability
        ``oracle_acceptance``, at no cost: isolates the system effect of SD).
      k: draft tokens per iteration (chain length); ignored when ``tree`` is set.
      tree: named tree in ``configs/spec/`` or a path to a YAML tree; None = chain of k.
      ngram_n: n-gram size matched by the prompt-lookup drafter.
      oracle_acceptance: per-position probability that the oracle drafter proposes the
        right token.
      auto: utility-driven K (``spec/utility.py``, ``--k auto``): each request drafts
        the K among ``auto_candidates`` (capped at ``k``; ``k`` is the largest) with the
        best measured utility, or decodes plainly where speculation loses. Chains only.
      auto_costs: where the iteration costs come from: ``measured`` (target and draft
        forwards timed at warm-up, per batch size) or ``model`` (the cost model on
        ``auto_hardware``).
      auto_hardware: cost-model preset for ``auto_costs: model`` (``cpu-measured``
        calibrates this machine).
      auto_explore_every: ``generate`` calls remember the per-row acceptance counts
        their tests measured (per batch size); while no candidate K would finish the
        static batch sooner than plain decoding, by at least ``auto_margin``, even at an
        optimistic bound of those rates (``utility.batch_pays``: the batch waits for its
        slowest row), calls decode plainly without testing, except every
        ``auto_explore_every``-th, which runs the controller again (0: test every call).
      auto_margin: the share of plain decoding's time a static K must save before a
        call runs the controller: the controller's program costs more than that K's
        (tests at other Ks, the draft's catch-up after plain phases, phase switches).
      budget: the target's verification-time expert budget (:class:`BudgetConfig`);
        prefill and plain decoding steps are never budgeted.
    """

    method: Literal["none", "draft", "ngram", "oracle", "eagle"] = "draft"
    k: int = 4
    tree: str | None = None
    ngram_n: int = 2
    oracle_acceptance: float = 0.8
    auto: bool = False
    auto_candidates: tuple[int, ...] = (1, 2, 4)
    auto_costs: Literal["measured", "model"] = "measured"
    auto_hardware: str = "cpu-measured"
    auto_test_iters: int = 2
    auto_set_iters: int = 24
    auto_explore_every: int = 16
    auto_margin: float = 0.05
    budget: BudgetConfig = BudgetConfig()

    @property
    def candidates(self) -> tuple[int, ...]:
        """The K values ``auto`` chooses among (besides 0): the candidates below ``k``,
        and ``k``."""
        return tuple(sorted({c for c in self.auto_candidates if c < self.k} | {self.k}))

    def validate(self, prefix: str = "spec") -> None:
        if self.method not in ("none", "draft", "ngram", "oracle", "eagle"):
            raise ConfigError(f"{prefix}.method={self.method!r} must be none, draft, ngram, "
                              "oracle or eagle")
        if not 0.0 <= self.oracle_acceptance <= 1.0:
            raise ConfigError(f"{prefix}.oracle_acceptance={self.oracle_acceptance} must be "
                              "in [0, 1]")
        if not 0 <= self.k <= 32:
            raise ConfigError(f"{prefix}.k={self.k} must be in [0, 32]")
        if self.ngram_n < 1:
            raise ConfigError(f"{prefix}.ngram_n={self.ngram_n} must be >= 1")
        if not isinstance(self.budget, BudgetConfig):
            raise ConfigError(f"{prefix}.budget={self.budget!r} must be a BudgetConfig")
        self.budget.validate(f"{prefix}.budget")
        if self.auto:
            if self.method in ("none", "eagle"):
                raise ConfigError(f"{prefix}.auto (--k auto) needs a draft, ngram or oracle "
                                  f"drafter, not {self.method!r}")
            if self.tree is not None:
                raise ConfigError(f"{prefix}.auto (--k auto) picks a chain length; drop "
                                  f"{prefix}.tree={self.tree!r}")
            if self.k < 1 or any(c < 1 for c in self.auto_candidates):
                raise ConfigError(f"{prefix}.k={self.k} and {prefix}.auto_candidates="
                                  f"{self.auto_candidates} must be >= 1 with auto")
            if self.auto_costs not in ("measured", "model"):
                raise ConfigError(f"{prefix}.auto_costs={self.auto_costs!r} must be measured "
                                  "or model")
            if not 0.0 <= self.auto_margin < 1.0:
                raise ConfigError(f"{prefix}.auto_margin={self.auto_margin} must be in "
                                  "[0, 1)")
            if self.auto_explore_every < 0:
                raise ConfigError(f"{prefix}.auto_explore_every={self.auto_explore_every} "
                                  "must be >= 0")
            if self.auto_test_iters < 1 or self.auto_set_iters < 1:
                raise ConfigError(f"{prefix}.auto_test_iters={self.auto_test_iters} and "
                                  f"auto_set_iters={self.auto_set_iters} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The OpenAI-compatible server."""

    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 4
    max_queue: int = 64
    max_seq_len: int = 512

    def validate(self, prefix: str = "serve") -> None:
        _positive(self, prefix, "slots", "max_queue", "max_seq_len")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{prefix}.port={self.port} must be in [0, 65535]")


def _positive(cfg: Any, prefix: str, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{prefix}.{name}={v!r} must be a positive integer")


# ---------------------------------------------------------------------------------------
# dict / YAML <-> dataclass


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Converts ``value`` to the annotated type ``tp`` or raises ConfigError naming key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}={value!r} has the wrong type")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} must be one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return from_dict(tp, value, prefix=key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a dict; unknown keys raise ConfigError naming them."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in fields:
            raise ConfigError(f"unknown config key {key!r} (known: {sorted(fields)})")
        kwargs[k] = _coerce(hints[k], v, key)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix or cls.__name__.replace("Config", "").lower())
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-python dict (tuples -> lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``a.b=value`` (value in YAML syntax) into (["a", "b"], value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of ``data`` with each ``key.sub=value`` override set."""
    import copy

    out = copy.deepcopy(data)
    for ov in overrides:
        path, value = parse_override(ov)
        d = out
        for p in path[:-1]:
            if d.get(p) is None:
                d[p] = {}
            if not isinstance(d[p], dict):
                raise ConfigError(f"override {ov!r}: {p!r} is not a mapping")
            d = d[p]
        d[path[-1]] = value
    return out


def resolve_config_path(name_or_path: str | Path, kind: str) -> Path:
    """``tree-15`` -> ``configs/spec/tree-15.yaml``; an existing path is returned as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = REPO_CONFIGS / kind / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    known = sorted(x.stem for x in (REPO_CONFIGS / kind).glob("*.yaml"))
    raise ConfigError(f"no {kind} config named {str(name_or_path)!r} (known: {known})")


def load_config(cls: type, name_or_path: str | Path | None = None,
                overrides: list[str] | None = None, kind: str = "models") -> Any:
    """Loads dataclass ``cls`` from a YAML file (or defaults) plus overrides."""
    data: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path, kind)
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)
