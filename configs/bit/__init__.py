"""BiT (Big Transfer) configs: upstream pre-training recipes and the offline demonstration."""
