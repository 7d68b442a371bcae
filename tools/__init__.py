"""Command-line tools: model table, benchmarks, weight conversion."""
