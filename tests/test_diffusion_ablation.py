"""benchmarks/diffusion_ablation.py: the row table is valid training config, the record and
its table, refusals before any work, and (slow) the whole script end to end on the tiny
config (`--smoke`): train, export, evaluate t2i + prompt control, resume by skipping."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import diffusion_ablation as A  # noqa: E402


def test_every_row_is_a_valid_override_of_the_stage():
    from vd_jax.config import load_config
    from vd_jax.train import apply_overrides
    for row in A.ROWS.values():
        cfg = load_config(A.STAGE_CONFIG)
        apply_overrides(cfg, list(row.overrides))
        assert set(row.sampling) <= set(A.SAMPLING_KEYS), row.name
        assert row.train_as is None or A.ROWS[row.train_as].overrides == row.overrides
    cfg = load_config(A.STAGE_CONFIG)
    apply_overrides(cfg, list(A.ROWS['v_zero_snr_min_snr'].overrides))
    assert cfg.model.schedule.prediction_type == 'v_prediction'
    assert cfg.model.schedule.rescale_zero_terminal_snr and cfg.loss.snr_gamma == 5.0
    assert A.DEFAULT_ROWS == ('v2', 'v_zero_snr', 'v_zero_snr_min_snr', 'offset_noise')
    assert A.ROWS['v_zero_snr'].sampling == {'spacing': 'trailing'}
    assert A.ROWS['offset_noise'].overrides == A.EPS_VD + ('noise.offset=0.05',)
    # each row trains its own objective whatever the recipe's default is (v3 made it v + zero
    # terminal SNR after this ablation): v2's row is eps on VD's schedule
    for name, (prediction, zero_snr) in {'v2': ('epsilon', False),
                                         'offset_noise': ('epsilon', False),
                                         'min_snr': ('epsilon', False),
                                         'v_prediction': ('v_prediction', False),
                                         'v_zero_snr': ('v_prediction', True)}.items():
        cfg = load_config(A.STAGE_CONFIG)
        apply_overrides(cfg, list(A.ROWS[name].overrides))
        assert (cfg.model.schedule.prediction_type,
                bool(cfg.model.schedule.rescale_zero_terminal_snr)) == (prediction, zero_snr), name


def test_arguments(tmp_path):
    a, shared = A.parse_args(['--out', str(tmp_path), '--rows', 'v2', '--', 'total_steps=5'])
    assert a.stage_config == A.STAGE_CONFIG and shared == ['total_steps=5']
    a, shared = A.parse_args(['--out', str(tmp_path), '--smoke', '--', 'seed=1'])
    assert a.stage_config == A.SMOKE_CONFIG and shared[-1] == 'seed=1' and a.eval_n == 4
    assert 'encoders.ckpt=random' in shared
    with pytest.raises(SystemExit) as e:
        A.parse_args(['--out', str(tmp_path), '--rows', 'v2,nope'])
    assert e.value.code == 2


def test_a_changed_command_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(A, 'run', lambda cmd: pytest.fail(f'ran {cmd}'))
    settings = dict(stage_config=A.STAGE_CONFIG, shared_overrides=['total_steps=5'], eval_n=200,
                    eval_flows='t2i', prompt_control_n=16, smoke=False)
    (tmp_path / 'ablation.json').write_text(json.dumps({'rows': {}, 'trainings': {},
                                                        'settings': settings}))
    with pytest.raises(SystemExit) as e:
        A.main(['--out', str(tmp_path), '--', 'total_steps=6'])
    assert 'use another --out' in str(e.value) and "'total_steps=5'" in str(e.value)


def test_markdown_table():
    record = {'settings': dict(stage_config='configs/train_vd_mini.py:dc',
                               shared_overrides=['total_steps=10'], eval_n=64,
                               prompt_control_n=16, smoke=False),
              'rows': {'v_zero_snr': dict(
                  overrides=list(A.V_ZERO_SNR), train_as=None, cpu='Some CPU',
                  sampling=dict(steps=25, scale=7.5, sampler='ddim', spacing='trailing',
                                guidance_rescale=0.0), train_seconds=600.0, eval_seconds=90.0,
                  eval=dict(t2i=dict(shape=0.8, colour=0.7, background=0.5, size=0.9,
                                     position=0.3, all=0.05),
                            prompt_control=dict(follows=dict(background=0.583, position=0.306),
                                                varies=dict(background=0.0, position=0.0))))}}
    md = A.markdown(record)
    lines = md.splitlines()
    assert lines[0].startswith('| row | training overrides | sampling | background follows')
    assert lines[2].startswith('| v_zero_snr | `model.schedule.prediction_type=v_prediction` ')
    assert '| ddim 25 steps, scale 7.5, trailing | 0.583 | 0.00 | 0.306 | 0.00 | 0.800 |' in md
    assert '| 10.0 min | 1.5 min |' in md and 'host Some CPU' in md and '`total_steps=10`' in md


@pytest.mark.slow
def test_smoke_run_and_resume(tmp_path):
    """Two rows on the tiny config (about 2.5 minutes on 2 busy cores): a zero-SNR row that
    shares its training with `v_zero_snr` and samples with trailing spacing + guidance rescale,
    and v2; then the same command again skips both without starting a process."""
    out = tmp_path / 'abl'
    cmd = [sys.executable, os.path.join(REPO, 'benchmarks', 'diffusion_ablation.py'), '--smoke',
           '--out', str(out), '--rows', 'v_zero_snr_rescale,v2']
    env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    rec = json.loads((out / 'ablation.json').read_text())
    assert list(rec['rows']) == ['v_zero_snr_rescale', 'v2']
    assert list(rec['trainings']) == ['v_zero_snr', 'v2']   # the row trained as v_zero_snr
    for name, r in rec['rows'].items():
        assert os.path.isdir(r['export']) and r['export'].endswith('step_3'), name
        assert r['train_seconds'] > 0 and r['eval_seconds'] > 0 and r['cpu'], name
        pc = r['eval']['prompt_control']
        assert set(pc['follows']) == {'background', 'position'} and pc['n'] == 1, name
        assert set(r['eval']['t2i']) >= {'shape', 'colour', 'all'}, name
        with open(r['eval']['metrics']) as f:
            m = json.load(f)
        assert m['settings']['spacing'] == pc['settings']['spacing'] == r['sampling']['spacing']
    z = rec['rows']['v_zero_snr_rescale']
    assert z['sampling']['spacing'] == 'trailing' and z['sampling']['guidance_rescale'] == 0.7
    assert z['eval']['prompt_control']['settings']['guidance_rescale'] == 0.7
    with open(os.path.join(z['export'], 'config.json')) as f:
        schedule = json.load(f)['schedule']
    assert schedule['prediction_type'] == 'v_prediction' and schedule['rescale_zero_terminal_snr']
    assert rec['rows']['v2']['sampling']['spacing'] == 'auto'
    md = (out / 'ablation.md').read_text()
    assert md.count('\n| v') == 2 and 'SMOKE RUN' in md
    # again: every row evaluated already, nothing runs
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.count('skipped') == 2 and '$ ' not in p.stdout, p.stdout
    assert json.loads((out / 'ablation.json').read_text())['rows'] == rec['rows']
