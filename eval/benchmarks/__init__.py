"""Benchmark drivers and their results: llmquant against its peers on real models (not installed).

The drivers run from the repository root, as scripts (``python eval/benchmarks/bench_peers.py``)
or modules (``python -m eval.benchmarks.bench_peers``); each says in its docstring what it
measures and where it writes. ``results/`` holds the committed measurements; ``peers_report.py``
turns the peers' into the section of ``docs/benchmarks.md``. The evaluation library they use,
``eval/`` itself (installed as ``llmquant_eval``), is what ``llmquant eval`` runs.
"""
