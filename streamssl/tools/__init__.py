"""The tools behind the CLI that stand beside the flow: evaluation, export, reports, packing, benchmarks."""
