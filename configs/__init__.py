"""Training configs: `default.py` and one file per variant or dataset."""
