"""Command-line tools: model table, benchmarks, weight conversion, evaluation and prediction."""
