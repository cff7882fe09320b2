"""scripts/gpu_check.py, the GPU checks' one script, runs end to end on a CPU with --smoke
(slow: about three minutes on 2 cores; run with -m slow before handing it to a GPU)."""

import json

import pytest
from helpers import run_in_repo


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_in_smoke_mode(tmp_path):
  result = run_in_repo('scripts/gpu_check.py', '--out', str(tmp_path), '--smoke', timeout=900)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = (tmp_path / 'summary.md').read_text()
  for heading in ('## 1. Fused against unfused', '## 2. B2', '## 3. The raised bars', '## 4.'):
    assert heading in summary
  assert 'skipped' not in summary and '[autotune level 4]' in summary
  rows = [json.loads(line) for line in (tmp_path / 'results.jsonl').read_text().splitlines()]
  kinds = {row.get('kind') for row in rows}
  assert {'machine', 'infer', 'b2_lever', 'roofline', 'train', 'end_to_end'} <= kinds
  assert next(r for r in rows if r.get('kind') == 'end_to_end')['returncode'] == 0
  assert (tmp_path / 'hlo_b2_fused.txt').stat().st_size > 0
