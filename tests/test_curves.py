"""Training curves as PNG (`python -m vd_jax.eval.curves`), what docs/vd-mini.md shows."""
import json

import numpy as np
from PIL import Image

from vd_jax.eval import curves


def _run(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    with open(d / 'metrics.jsonl', 'w') as f:
        for r in rows:
            f.write(json.dumps(r) + '\n')
    return str(d)


def test_chained_runs_continue_the_steps_and_draw_every_panel(tmp_path):
    a = _run(tmp_path, 'basic', [{'step': s, 'loss': 1.0 / s} for s in range(1, 101)])
    b = _run(tmp_path, 'dc', [{'step': s, 'loss': 0.01, 'val/t2i/colour': 0.1 * s / 50}
                              for s in range(50, 101, 50)])
    panels = curves.collect([(a, 'basic'), (b, 'dc')], ['loss', 'val/t2i/colour'], chain=True)
    assert set(panels) == {'loss', 'val/t2i/colour'}
    assert panels['loss']['dc'][0][0] == 150          # dc's step 50 follows basic's 100
    assert list(panels['val/t2i/colour']) == ['dc']
    smooth = curves.collect([(a, 'basic')], ['loss'], smooth=10)['loss']['basic']
    assert abs(smooth[9][1] - np.mean([1.0 / s for s in range(1, 11)])) < 1e-12
    out = curves.plot(panels, str(tmp_path / 'c.png'), 'title')
    img = np.asarray(Image.open(out).convert('RGB'))
    assert img.shape == (220 + 24, 2 * 360, 3)
    # the two runs' lines are drawn in their palette colours
    for colour in curves.PALETTE[:2]:
        assert (img == colour).all(-1).sum() > 50


def test_per_run_panels_and_a_missing_workdir(tmp_path, capsys):
    a = _run(tmp_path, 'autokl', [{'step': 1, 'loss/recon': 0.5}])
    b = _run(tmp_path, 'optimus', [{'step': 1, 'loss/recon': 100.0}])
    panels = curves.collect([(a, 'autokl'), (b, 'optimus')], ['loss/recon'], per_run=True)
    assert set(panels) == {'autokl: loss/recon', 'optimus: loss/recon'}
    assert curves.main([str(tmp_path / 'x.png'), str(tmp_path / 'nothing')]) == 2
    assert "nothing" in capsys.readouterr().err
