"""Prometheus metrics of an :class:`~moesd_jax.serving.engine.Engine` (vLLM's names).

A custom collector reads the engine's cumulative counters at scrape time, so each app
gets its own :class:`prometheus_client.CollectorRegistry` (several apps, e.g. in tests,
do not collide) and the engine itself does not depend on prometheus_client.

Names (vLLM's with a ``moesd:`` prefix; every sample has a ``model_name`` label):
  moesd:spec_decode_num_drafts_total                 verify steps of rows that drafted
  moesd:spec_decode_num_draft_tokens_total           draft tokens proposed
  moesd:spec_decode_num_accepted_tokens_total        draft tokens accepted
  moesd:spec_decode_num_accepted_tokens_per_pos_total{position}
  moesd:generation_tokens_total / moesd:prompt_tokens_total
  moesd:generation_tokens_per_second                 over the last 10 s
  moesd:request_success_total{finished_reason}
  moesd:num_requests_running / moesd:num_requests_waiting / moesd:num_slots
  moesd:spec_decode_unique_experts_per_step          histogram: distinct experts per MoE
                                                     layer (mean over layers) of each
                                                     batched verification forward
  moesd:spec_decode_unique_experts_last_step         the same, last step (gauge)
  moesd:verify_steps_total / moesd:engine_steps_total
"""

from __future__ import annotations

import copy

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from moesd_jax.serving.engine import UNIQUE_EXPERT_BUCKETS, Engine


class EngineCollector:
    """Prometheus collector over one engine's counters."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        e = self.engine
        with e.lock:
            c = copy.deepcopy(e.counters)
        running, waiting = e.num_running, e.num_waiting
        tps = e.tokens_per_second()
        m = self.model_name

        def counter(name, doc, value):
            f = CounterMetricFamily(f"moesd:{name}", doc, labels=["model_name"])
            f.add_metric([m], value)
            return f

        def gauge(name, doc, value):
            f = GaugeMetricFamily(f"moesd:{name}", doc, labels=["model_name"])
            f.add_metric([m], value)
            return f

        yield counter("spec_decode_num_drafts", "Verification steps of rows that drafted.",
                      c.num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed.",
                      c.num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                      c.num_accepted_tokens)
        f = CounterMetricFamily("moesd:spec_decode_num_accepted_tokens_per_pos",
                                "Accepted draft tokens per draft position.",
                                labels=["model_name", "position"])
        for j, v in enumerate(c.accepted_per_pos if e.cfg.k_eff else []):  # K or tree depth
            f.add_metric([m, str(j)], v)
        yield f
        yield counter("generation_tokens", "Generated tokens.", c.generation_tokens)
        yield counter("prompt_tokens", "Prefilled prompt tokens.", c.prompt_tokens)
        f = CounterMetricFamily("moesd:request_success", "Finished requests by reason.",
                                labels=["model_name", "finished_reason"])
        for reason, v in sorted(c.finished.items()):
            f.add_metric([m, reason], v)
        yield f
        yield counter("verify_steps", "Batched verification forwards.", c.verify_steps)
        yield counter("engine_steps", "Engine steps.", c.engine_steps)
        yield gauge("generation_tokens_per_second", "Generated tokens/s over the last 10 s.",
                    tps)
        yield gauge("num_requests_running", "Requests in slots.", running)
        yield gauge("num_requests_waiting", "Requests in the queue.", waiting)
        yield gauge("num_slots", "Static batch size of the engine.", e.slots)
        h = HistogramMetricFamily(
            "moesd:spec_decode_unique_experts_per_step",
            "Distinct experts per MoE layer (mean over layers) of each verification forward.",
            labels=["model_name"])
        cum, buckets = 0, []
        for b, n in zip(UNIQUE_EXPERT_BUCKETS, c.unique_bucket_counts):
            cum += n
            buckets.append((str(float(b)), cum))
        buckets.append(("+Inf", cum + c.unique_bucket_counts[-1]))
        h.add_metric([m], buckets, c.unique_sum)
        yield h
        yield gauge("spec_decode_unique_experts_last_step",
                    "Distinct experts per MoE layer (mean) of the last verification forward.",
                    c.unique_last)


def make_registry(engine: Engine, model_name: str) -> CollectorRegistry:
    """A fresh registry holding only this engine's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(engine, model_name))
    return reg
