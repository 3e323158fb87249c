"""keyd benchmarks: `./dev.sh bench` (or `python -m benchmarks`). Results: docs/performance.md."""
