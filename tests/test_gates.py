"""Stage-0 gates (vd_jax/eval/gates.py) and the stage runner's use of them.

- each gate computes what it claims: synthetic perfect networks pass with every number 1, and
  a network that loses one attribute fails on exactly that attribute;
- the shipped VD-mini v3 parts: the gate numbers measured for docs/vd-mini.md (minus a margin,
  so a regression in the weights, the encoders or the reader fails);
- `python -m vd_jax.train.stages` stops on a failed gate (exit code 4, numbers in stages.json)
  and goes on with --ignore-gates (training stubbed: the runner's machinery only).
"""
import json
import os

import numpy as np
import pytest

from vd_jax.data import shapes as W
from vd_jax.eval import gates
from vd_jax.eval.shapes_reader import parse_caption
from vd_jax.pipeline import MODELS

SHIPPED = MODELS['vd-mini']


def _one_hot(attrs: W.Attributes, drop=()) -> np.ndarray:
    """26-d embedding of the attributes: one block per field, zero for fields in `drop`."""
    blocks = []
    for f, value in zip(W.FIELDS, attrs):
        b = np.zeros(len(W.VOCAB[f]), np.float32)
        if f not in drop:
            b[W.VOCAB[f].index(value)] = 1
        blocks.append(b)
    return np.concatenate(blocks)


_BY_PIXELS = {W.render(a).tobytes(): a for a in W.ALL_COMBINATIONS}


def _image_attrs(images01):
    return [_BY_PIXELS[np.rint(np.asarray(x) * 255).astype(np.uint8).tobytes()]
            for x in images01]


def test_autokl_gate_passes_a_perfect_autoencoder_and_fails_a_mirroring_one():
    perfect = gates.autokl_gate(lambda x: x)
    assert perfect['passed'] and perfect['failed'] == []
    assert perfect['numbers']['accuracy'] == {f: 1.0 for f in W.FIELDS + ('all',)}
    assert perfect['numbers']['n'] == len(W.HELDOUT_COMBINATIONS) == 174
    # mirrored left-right: shape (all symmetric), colour, background, size intact; left and
    # right swap, so position is right only in the middle column
    mirror = gates.autokl_gate(lambda x: x[:, :, ::-1])
    acc = mirror['numbers']['accuracy']
    assert not mirror['passed'] and mirror['failed'] == ['accuracy/position']
    middle = np.mean([a.position in ('top', 'center', 'bottom') for a in W.HELDOUT_COMBINATIONS])
    assert acc['position'] == pytest.approx(middle, abs=1e-4)
    assert all(acc[f] == 1.0 for f in ('shape', 'colour', 'background', 'size'))
    assert 'position' in gates.describe(mirror) and 'FAILED' in gates.describe(mirror)


def test_clip_gate_passes_perfect_towers_and_fails_a_tower_blind_to_one_attribute():
    text = lambda caps: np.stack([_one_hot(parse_caption(c)) for c in caps])  # noqa: E731
    image = lambda ims: np.stack([_one_hot(a) for a in _image_attrs(ims)])    # noqa: E731
    perfect = gates.clip_gate(text, image)
    assert perfect['passed'], perfect
    for d in ('image_to_text', 'text_to_image'):
        assert perfect['numbers'][d] == {f: 1.0 for f in W.FIELDS + ('all',)}
    assert perfect['numbers']['n'] == 174 * 6
    # a text tower blind to size: a caption and its other-size neighbour embed alike (a tie
    # is not a win), so size fails in both directions and nothing else does
    blind = gates.clip_gate(
        lambda caps: np.stack([_one_hot(parse_caption(c), drop=('size',)) for c in caps]), image)
    assert not blind['passed']
    assert blind['failed'] == ['image_to_text/size', 'text_to_image/size']
    for d in ('image_to_text', 'text_to_image'):
        assert blind['numbers'][d]['size'] == 0.0 and blind['numbers'][d]['shape'] == 1.0


def test_clip_gate_compares_with_one_attribute_neighbours_only():
    """An image tower that confuses colours two apart in the table (red~blue): the image
    still beats captions 1 or 3+ colours away, loses to its confusable colour only."""
    colours = W.VOCAB['colour']

    def image(ims):
        out = []
        for a in _image_attrs(ims):
            e = _one_hot(a)
            k = colours.index(a.colour)
            e[4 + (k + 2) % 8] = 1.0          # the colour block starts after 4 shapes
            out.append(e)
        return np.stack(out)
    text = lambda caps: np.stack([_one_hot(parse_caption(c)) for c in caps])  # noqa: E731
    rec = gates.clip_gate(text, image)
    # image -> text: caption of colour k+2 scores the same as the own caption: a tie, a loss
    assert rec['numbers']['image_to_text']['colour'] == 0.0
    # text -> image: the image of colour k-2 also lights up colour k: a tie again
    assert rec['numbers']['text_to_image']['colour'] == 0.0
    assert rec['numbers']['image_to_text']['position'] == 1.0
    assert rec['failed'] == ['image_to_text/colour', 'text_to_image/colour']


def test_optimus_gate_reports_per_attribute_and_template():
    perfect = gates.optimus_gate(lambda caps: list(caps))
    assert perfect['passed'] and perfect['numbers']['exact'] == 1.0
    assert set(perfect['numbers']['per_template']) == {str(t) for t in range(6)}

    def circles(caps):  # every shape becomes a circle, and template 4 loses its background
        out = []
        for c in caps:
            for s in W.SHAPES:
                c = c.replace(f' {s}', ' circle')
            if c.startswith(tuple(p + ':' for p in W.POSITIONS)):
                c = c.rsplit(' on ', 1)[0]
            out.append(c)
        return out
    bad = gates.optimus_gate(circles)
    n = bad['numbers']
    circle_share = np.mean([a.shape == 'circle' for a in W.HELDOUT_COMBINATIONS])
    assert n['accuracy']['shape'] == pytest.approx(circle_share, abs=1e-4)
    assert n['per_template']['4']['background'] == 0.0
    assert n['per_template']['0']['background'] == 1.0
    assert n['accuracy']['background'] == pytest.approx(5 / 6, abs=1e-4)
    assert 'accuracy/shape' in bad['failed'] and 'accuracy/background' in bad['failed']
    assert 'per_template/4/all' in bad['failed'] and not bad['passed']


def test_gates_refuse_unknown_names_and_missing_parts(tmp_path, capsys):
    from vd_jax.eval.__main__ import main
    assert main(['gates', '--gates', 'vae']) == 2
    assert 'unknown gates' in capsys.readouterr().err
    assert main(['gates', '--ckpt', str(tmp_path)]) == 2
    assert 'config.json' in capsys.readouterr().err
    with pytest.raises(ValueError, match='unknown gate'):
        gates.run_gate('diffuser', SHIPPED)

# ------------------------------------------------------------------------------------------
# the shipped VD-mini v3 (numbers in docs/vd-mini.md, 'Stage-0 gates' and 'v3 stage 0')
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_autokl_passes_its_gate():
    rec = gates.run_gate('autokl', SHIPPED)
    assert rec['passed'], rec                     # measured: every attribute 1.0
    assert rec['numbers']['mean_abs_error'] < 0.01, rec   # measured 0.0061


@pytest.mark.slow
def test_shipped_clip_passes_its_gate(capsys):
    """v3's CLIP (hard-negative batches): measured image->text shape 0.999, every other
    attribute 1.0 both ways (v2 failed on position: 0.832 / 0.817)."""
    from vd_jax.eval.__main__ import main
    assert main(['gates', '--gates', 'clip']) == 0
    rec = json.loads(capsys.readouterr().out)['clip']
    assert rec['passed'] and rec['failed'] == [], rec
    for d in ('image_to_text', 'text_to_image'):
        n = rec['numbers'][d]
        assert min(n[f] for f in W.FIELDS) >= 0.99, n


@pytest.mark.slow
def test_shipped_optimus_passes_its_gate():
    """v3's Optimus (1000 deterministic steps first): measured every attribute 1.0 in every
    template, captions exact (v2: shape 0.26, background 0.35, all five 0.036)."""
    rec = gates.run_gate('optimus', SHIPPED)
    assert rec['passed'], rec
    assert rec['numbers']['accuracy']['all'] >= 0.99, rec['numbers']['accuracy']

# ------------------------------------------------------------------------------------------
# the stage runner
# ------------------------------------------------------------------------------------------


@pytest.fixture
def stub_training(monkeypatch, tmp_path):
    """train() replaced by a stub that 'exports' an empty folder; the gates by one that fails
    the clip gate (each call recorded)."""
    trained, checked = [], []

    def train(cfg, workdir):
        export = os.path.join(workdir, 'export', 'step_1')
        os.makedirs(export, exist_ok=True)
        trained.append(os.path.basename(workdir))
        return {'status': 'finished', 'step': 1, 'history': {1: {'loss': 0.5}}, 'export': export}

    def run_gate(gate, ckpt):
        checked.append(gate)
        ok = gate != 'clip'
        return dict(gate=gate, threshold=gates.THRESHOLDS[gate], passed=ok,
                    failed=[] if ok else ['image_to_text/position'],
                    numbers={'image_to_text': {'position': 1.0 if ok else 0.83}}, seconds=0.0)
    monkeypatch.setattr('vd_jax.train.loop.train', train)
    monkeypatch.setattr(gates, 'run_gate', run_gate)
    return trained, checked


def test_stage_runner_stops_on_a_failed_gate_and_goes_on_with_the_flag(stub_training, tmp_path,
                                                                        capsys):
    from vd_jax.train.stages import main
    trained, checked = stub_training
    work = str(tmp_path / 'w')
    args = ['--workdir', work, '--stages', 'autokl,clip,optimus']
    assert main(args) == 4
    err = capsys.readouterr().err
    assert 'gate clip: FAILED' in err and 'image_to_text/position = 0.8300' in err
    assert trained == ['autokl', 'clip'] and checked == ['autokl', 'clip']   # optimus not run
    with open(os.path.join(work, 'stages.json')) as f:
        record = json.load(f)
    assert record['autokl']['gate']['passed'] and not record['clip']['gate']['passed']
    # again: the recorded result stops it again, without retraining or re-measuring
    assert main(args) == 4
    assert trained == ['autokl', 'clip'] and checked == ['autokl', 'clip']
    # with the flag it goes on to optimus and checks its gate too
    assert main(args + ['--ignore-gates']) == 0
    assert trained == ['autokl', 'clip', 'optimus'] and checked[-1] == 'optimus'
    with open(os.path.join(work, 'stages.json')) as f:
        assert json.load(f)['optimus']['gate']['passed']
