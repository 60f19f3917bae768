"""Analysis tools: the MoESD cost model (``cost_model``) and routing-trace analysis
(``routing``)."""
