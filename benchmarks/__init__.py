"""Speed / memory / FLOPs benchmarks (run as ``python -m benchmarks.<name>``; not collected by pytest)."""
