"""The README's API example runs and does what it says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def test_api_example_runs_and_fused_logits_match():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
  assert blocks, 'README.md has no python example'
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)
  expected = namespace['model'].apply(namespace['variables'], namespace['images'])
  assert namespace['logits'].shape == (8, 1000)
  assert np.abs(expected).max() > 0.1  # Not all zero: a wrong fusion would show.
  np.testing.assert_allclose(namespace['logits'], expected, rtol=1e-4, atol=1e-4)
