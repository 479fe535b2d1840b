"""The experiment grid: methods × tasks × seeds, resumable and parallel-safe
(`hybrid-distill experiment`, see cli.py and docs/results.md)."""
