"""The end-to-end demo: `hybrid-distill demo [--quick] [--out DIR]` (see run.py)."""
