"""The ``--budget*`` command-line options shared by generate, serve and bench."""

from __future__ import annotations

import argparse

from moesd_jax.config import BUDGET_POLICIES, BudgetConfig


def add_budget_arguments(ap: argparse.ArgumentParser, gate: bool = True) -> None:
    """Adds ``--budget POLICY --budget-b B --budget-mass F --budget-truncate`` (and, with
    ``gate``, ``--budget-min-agreement A``)."""
    g = ap.add_argument_group("expert budget (verification forwards only; spec/budget.py)")
    g.add_argument("--budget", default="none", metavar="POLICY",
                   help=f"one of {', '.join(BUDGET_POLICIES)}: moe_spec = MoE-Spec (lossy, "
                   "drafts re-pick experts among the top-B by routing mass); mass = keep "
                   "experts until --budget-mass of the mass (at most B); lossless = B experts "
                   "for the likeliest draft nodes, prune nodes that lose one (exact output)")
    g.add_argument("--budget-b", type=int, default=None, metavar="B",
                   help="experts kept per MoE layer per verification (top_k <= B <= E; "
                   "the root token's own top-k come on top)")
    g.add_argument("--budget-mass", type=float, default=0.9, metavar="F",
                   help="--budget mass: routing-mass fraction to cover (default 0.9)")
    g.add_argument("--budget-truncate", action="store_true",
                   help="moe_spec/mass: drop non-kept experts instead of re-picking")
    if gate:
        g.add_argument("--budget-min-agreement", type=float, default=None, metavar="A",
                       help="quality gate: measure greedy token agreement with the "
                       "unbudgeted target on calibration prompts and, below A, double B "
                       "(up to E), then fall back to lossless")


def budget_from_args(args: argparse.Namespace) -> BudgetConfig:
    """The validated :class:`BudgetConfig` of the parsed ``--budget*`` options.

    Raises:
      ConfigError: naming the bad option value.
    """
    from moesd_jax.config import ConfigError

    if args.budget not in BUDGET_POLICIES:
        raise ConfigError(f"--budget {args.budget!r} must be one of {list(BUDGET_POLICIES)}")
    bc = BudgetConfig(policy=args.budget, b=args.budget_b, truncate=args.budget_truncate,
                      mass=args.budget_mass,
                      min_agreement=getattr(args, "budget_min_agreement", None))
    try:
        bc.validate()
    except ConfigError as e:
        raise ConfigError(option_names(str(e))) from None
    return bc


def option_names(msg: str) -> str:
    """An error message about ``[spec.]budget.*`` fields with the command-line option
    names instead (``spec.budget.b=1`` -> ``--budget-b=1``)."""
    msg = msg.replace("spec.budget.", "budget.")
    for field, opt in (("budget.policy", "--budget"), ("budget.b", "--budget-b"),
                       ("budget.mass", "--budget-mass"),
                       ("budget.truncate", "--budget-truncate"),
                       ("budget.min_agreement", "--budget-min-agreement")):
        msg = msg.replace(field, opt)
    return msg
