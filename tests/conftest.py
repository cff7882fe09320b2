"""Test set-up: the CPU backend, and the test helpers importable."""

import os
import sys

# Tests run on the CPU; this also keeps the CUDA plugin from probing for a GPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
