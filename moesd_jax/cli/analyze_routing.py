"""Routing report: unique experts per verification step, measured vs independence.

  python scripts/analyze_routing.py                          # bundled pair, held-out code prompts
  python scripts/analyze_routing.py --model CKPT --spec draft --draft DRAFT --prompts FILE
  python scripts/analyze_routing.py --traces traces.npz      # a saved trace file

Decodes the prompts twice with routing recorded (``analysis/routing.py``): plain
decoding (one token per step: unique experts for windows of T consecutive tokens, T =
1..8) and speculative decoding (``--spec``, K = ``--k``: the real verification steps,
their draft tokens included). For each it prints the measured unique experts per layer,
the time-shuffled independence baseline (same expert frequencies), the uniform formula
``N(1-(1-k/N)^T)``, the reduction with a 95% confidence interval over prompts, the
step-to-step overlap, and an Amdahl split of a step (``--hardware``, the cost model).
Writes ``<out-dir>/<stem>.json`` (the whole report) and ``.png`` (unique experts vs T).

``--prompts FILE``: one prompt per line, or JSON lines with ``prompt`` (text) or
``prompt_ids``. Default: ``--num-prompts`` held-out code prompts (the bench set).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_prompts(path: str, tok) -> list[list[int]]:
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            if "prompt_ids" in obj:
                out.append([int(t) for t in obj["prompt_ids"]])
            elif "prompt" in obj:
                out.append(tok.encode(obj["prompt"]))
            else:
                raise ValueError(f"{path}:{i}: needs 'prompt' or 'prompt_ids'")
        else:
            out.append(tok.encode(line))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _decode_traces(decoder, prompts, max_new: int, batch: int):
    from moesd_jax.analysis.routing import record_traces

    traces = []
    for i in range(0, len(prompts), batch):
        tr, _ = record_traces(decoder, prompts[i:i + batch], max_new)
        traces += tr
    return traces


def write_plot(by_window: list[dict], sd: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    t = [r["tokens"] for r in by_window]
    ax.plot(t, [r["unique"] for r in by_window], "-o", label="measured (consecutive tokens)")
    ax.plot(t, [r["baseline"] for r in by_window], "--s",
            label="independence (shuffled within each prompt)")
    ax.plot(t, [r["baseline_global"] for r in by_window], "-.^",
            label="independence (shuffled across prompts)")
    ax.plot(t, [r["formula"] for r in by_window], ":", color="grey",
            label="N(1-(1-k/N)^T), uniform")
    if sd is not None:
        ax.errorbar([sd["tokens_per_step"]], [sd["unique"]], fmt="*", ms=11, color="C3",
                    label=f"SD verify steps (T={sd['tokens_per_step']:.0f})")
        ax.plot([sd["tokens_per_step"]], [sd["baseline"]], "x", ms=9, color="C3",
                label="SD steps, shuffled")
    ax.set_xlabel("tokens per step T")
    ax.set_ylabel("unique experts per layer")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="target (default: bundled)")
    ap.add_argument("--draft", default=None, help="draft (default: bundled with --spec draft)")
    ap.add_argument("--spec", default="draft", choices=["none", "draft", "ngram", "eagle"],
                    help="drafter for the verification-step traces (none: only plain "
                    "decoding)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", default=None, help="prompt file (see above)")
    ap.add_argument("--num-prompts", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--traces", default=None,
                    help="analyse this .npz of traces (analysis.routing.save_traces) instead")
    ap.add_argument("--save-traces", default=None, help="write the SD traces here (.npz)")
    ap.add_argument("--hardware", default="cpu-measured",
                    help="cost-model preset for the Amdahl split; 'none' to skip")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed of the baseline")
    ap.add_argument("--out-dir", default="docs")
    ap.add_argument("--stem", default="routing_report")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = ap.parse_args(argv)

    from moesd_jax.analysis import routing
    from moesd_jax.config import ConfigError, SpecConfig

    report: dict = {}
    try:
        if min(args.k, args.num_prompts, args.max_new_tokens, args.batch) < 1:
            raise ValueError(f"--k={args.k}, --num-prompts={args.num_prompts}, "
                             f"--max-new-tokens={args.max_new_tokens} and --batch={args.batch}"
                             " must be >= 1")
        cfg = None
        if args.traces:
            traces, n_exp, top_k = routing.load_traces(args.traces)
            sd_rep = routing.analyze(traces, n_exp, top_k, seed=args.seed)
            by_window = []
            if all(t.shape[1] == 1 for t in traces):
                by_window = routing.unique_vs_tokens([routing.tokens_trace(t) for t in traces],
                                                     n_exp, top_k, seed=args.seed)
            report["source"] = args.traces
        else:
            from moesd_jax.runtime import load_models
            from moesd_jax.spec.decoder import SpecDecoder

            lm = load_models(args.model, args.draft, args.spec, k=args.k)
            cfg = lm.target.cfg
            if cfg.moe is None:
                raise ValueError(f"--model {lm.target_path}: a dense model routes nothing")
            n_exp, top_k = cfg.moe.num_experts, cfg.moe.top_k
            if args.prompts:
                prompts = read_prompts(args.prompts, lm.tokenizer)
            else:
                from moesd_jax.data import heldout_prompts

                prompts = [lm.tokenizer.encode(t) for t in
                           heldout_prompts(lm.tokenizer, n=args.num_prompts)]
            ar = SpecDecoder(lm.target, spec=SpecConfig(method="none"))
            ar_traces = _decode_traces(ar, prompts, args.max_new_tokens, args.batch)
            by_window = routing.unique_vs_tokens([routing.tokens_trace(t) for t in ar_traces],
                                                 n_exp, top_k, seed=args.seed)
            sd_rep = None
            if args.spec != "none":
                sd = SpecDecoder(lm.target, lm.draft, spec=lm.spec)
                traces = _decode_traces(sd, prompts, args.max_new_tokens, args.batch)
                sd_rep = routing.analyze(traces, n_exp, top_k, seed=args.seed)
                if args.save_traces:
                    routing.save_traces(args.save_traces, traces, n_exp, top_k)
            report["source"] = {"model": lm.target_path, "draft": lm.draft_path,
                                "spec": args.spec, "k": args.k, "prompts": len(prompts),
                                "max_new_tokens": args.max_new_tokens}
        report["by_window"] = by_window
        report["sd_steps"] = sd_rep.as_dict() if sd_rep is not None else None
        if args.hardware != "none" and cfg is not None:
            from moesd_jax.analysis.cost_model import preset

            hw = preset(args.hardware)
            t_sd = round(sd_rep.tokens_per_step) if sd_rep is not None else 1
            u1 = by_window[0]["unique"] if by_window else None
            report["amdahl"] = {
                "hardware": hw.name,
                "step_T1": routing.amdahl(cfg, hw, 1, 1, u1),
                f"verify_T{t_sd}": routing.amdahl(cfg, hw, 1, t_sd,
                                                  sd_rep.unique if sd_rep else None)}
    except (ValueError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(report, indent=1))
    if by_window:
        write_plot(by_window, report["sd_steps"], out / f"{args.stem}.png",
                   f"routing, {n_exp} experts top-{top_k}: measured vs independence")
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"# routing report ({n_exp} experts, top-{top_k}); wrote {out / args.stem}.json"
          + (" and .png" if by_window else ""))
    if by_window:
        print("# plain decoding, windows of T consecutive tokens (unique experts per layer):")
        print("# shuffled: rows permuted in time within each prompt (temporal correlation "
              "only); global: across all prompts (also each prompt's own expert preferences); "
              "reduction = 1 - measured/baseline pooled, [95% CI of the per-prompt mean]")
        print(f"{'T':>2} {'measured':>8} {'shuffled':>8} {'reduction':>20} {'global':>7} "
              f"{'reduction':>20} {'formula':>7}")
        for r in by_window:
            lo, hi = r["reduction_ci"][1:]
            glo, ghi = r["reduction_global_ci"][1:]
            print(f"{r['tokens']:>2} {r['unique']:>8.2f} {r['baseline']:>8.2f} "
                  f"{r['reduction']:>5.1%} [{lo:>5.1%}, {hi:>5.1%}] "
                  f"{r['baseline_global']:>7.2f} {r['reduction_global']:>5.1%} "
                  f"[{glo:>5.1%}, {ghi:>5.1%}] {r['formula']:>7.2f}")
    s = report["sd_steps"]
    if s is not None:
        lo, hi = s["reduction_ci"][1:]
        glo, ghi = s["reduction_global_ci"][1:]
        print(f"# verification steps: {s['steps']} steps of T={s['tokens_per_step']:.1f} tokens "
              f"over {s['requests']} prompts: {s['unique']:.2f} unique experts/layer; "
              f"shuffled within prompts {s['baseline']:.2f} (reduction {s['reduction']:.1%}, "
              f"95% CI [{lo:.1%}, {hi:.1%}]); shuffled across prompts "
              f"{s['baseline_global']:.2f} (reduction {s['reduction_global']:.1%}, 95% CI "
              f"[{glo:.1%}, {ghi:.1%}]); uniform formula {s['formula']:.2f}; step-to-step "
              f"overlap {s['overlap']:.1%}")
    if "amdahl" in report:
        for name, a in report["amdahl"].items():
            if name == "hardware":
                continue
            print(f"# Amdahl ({report['amdahl']['hardware']}, batch 1, {name}): step "
                  f"{a['step_ms']:.2f} ms, routed experts {a['expert_fraction']:.0%} "
                  f"(expert-side savings can give at most {a['max_speedup_from_experts']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
