"""Benchmarks as a library: the checked workloads (``workloads``), timing (``timing``), the report
(``report``) and the analytic roofline (``roofline``). ``fastdit bench`` (``fastdit.cli.bench``) runs them; the
block-design ablation (``ablation``) is ``fastdit ablation``'s."""
