"""The prompt-control measure on stand-in models: one that draws what the prompt says, and one
whose background comes from the seed (what VD's schedule with eps prediction learns)."""
import os

import numpy as np

from vd_jax.data import shapes as W
from vd_jax.eval.prompt_control import prompt_control
from vd_jax.eval.shapes_reader import parse_caption


class Obedient:
    """Renders exactly the prompt's attributes."""
    def text_to_image(self, prompts, n=1, seed=0, **kw):
        return np.stack([W.render(parse_caption(p)) for p in prompts]).astype(np.float32) / 255.


class SeedBackground(Obedient):
    """Follows the prompt except the background, which the seed picks."""
    def text_to_image(self, prompts, n=1, seed=0, **kw):
        out = []
        for j, p in enumerate(prompts):
            bg = W.VOCAB['background'][(seed + j) % 3]
            out.append(W.render(parse_caption(p)._replace(background=bg)))
        return np.stack(out).astype(np.float32) / 255.


def test_an_obedient_model_follows_every_word():
    rec = prompt_control(Obedient(), 6)
    assert rec['follows'] == {'background': 1.0, 'position': 1.0}
    assert rec['varies'] == {'background': 1.0, 'position': 1.0}


def test_a_seed_driven_background_is_caught():
    rec = prompt_control(SeedBackground(), 6)
    assert abs(rec['follows']['background'] - 1 / 3) < 1e-6 and rec['varies']['background'] == 0.0
    assert rec['follows']['position'] == 1.0 and rec['chance']['position'] == 1 / 9


# ------------------------------------------------------------------------------------------
# `python -m vd_jax.eval shapes --prompt-control N`: the measure from the command line
# ------------------------------------------------------------------------------------------

class CliStub(Obedient):
    """What the shapes command needs of a model, recording every sampling call's keywords."""
    image_size = W.IMAGE_SIZE
    source = 'stub'
    components = None
    schedule = None      # as VD's: 'auto' keeps the original grid (recorded as spacing_used)

    def __init__(self, tasks=('text_to_image',)):
        self.tasks, self.calls = tasks, []

    def check_task(self, task):
        from vd_jax.errors import InputError
        if task not in self.tasks:
            raise InputError(f'the stub cannot do {task}')

    def text_to_image(self, prompts, n=1, seed=0, **kw):
        self.calls.append(dict(kw, seed=seed, batch=len(prompts)))
        return super().text_to_image(prompts, n, seed)


def _shapes(monkeypatch, tmp_path, capsys, stub, *flags):
    import json
    import vd_jax.eval.__main__ as cli
    monkeypatch.setattr(cli, '_load', lambda args: stub)
    code = cli.main(['shapes', '--model', 'tiny', '--flows', 't2i', '--n', '4',
                     '--out', str(tmp_path / 'e'), *flags])
    out, err = capsys.readouterr()
    if code != 0:
        return code, out, err, None
    (run,) = os.listdir(tmp_path / 'e')
    with open(tmp_path / 'e' / run / 'metrics.json') as f:
        return code, out, err, json.load(f)


def test_cli_prompt_control_record_uses_the_sampling_flags(monkeypatch, tmp_path, capsys):
    stub = CliStub()
    code, out, err, rec = _shapes(monkeypatch, tmp_path, capsys, stub, '--prompt-control', '5',
                                  '--steps', '7', '--scale', '3', '--sampler', 'euler',
                                  '--spacing', 'trailing', '--guidance-rescale', '0.7',
                                  '--batch-size', '2', '--seed', '3')
    assert code == 0, err
    pc = rec['prompt_control']
    assert pc['follows'] == {'background': 1.0, 'position': 1.0} and pc['n'] == 5
    assert pc['varies'] == {'background': 1.0, 'position': 1.0}
    assert pc['settings'] == dict(steps=7, scale=3.0, sampler='euler', spacing='trailing',
                                  karras=False, guidance_rescale=0.7, n=5,
                                  attributes=['background', 'position'], seed=3, template=0,
                                  batch_size=2)
    assert 'prompt_control: {' in out and rec['flows']['t2i']['accuracy']['all'] == 1.0
    assert rec['settings']['spacing_used'] == 'trailing'   # the grid sampling used
    # every call (the t2i flow's and prompt control's) sampled with the flags, in batches <= 2
    assert all(c['steps'] == 7 and c['spacing'] == 'trailing' and c['sampler'] == 'euler'
               and c['guidance_rescale'] == 0.7 and c['batch'] <= 2 for c in stub.calls)
    # prompt control: 3 background + 9 position words, 5 bases each, seeds 3..7 for each word
    pc_calls = [c for c in stub.calls if c['scale'] == 3.0][-(12 * 3):]
    assert sorted({c['seed'] for c in pc_calls}) == [3, 5, 7]
    # the grids: a row per base (5 < 8 shown), a column per value, as the model drew them
    from vd_jax.image_io import load_image
    from vd_jax.outputs import make_grid
    assert pc['values']['background'] == list(W.VOCAB['background'])
    for attr, cols in (('background', 3), ('position', 9)):
        grid = load_image(pc['grids'][attr])
        bases = [W.sample('heldout', 5, 3)[j].attrs for j in range(5)]
        want = np.stack([W.render(b._replace(**{attr: v})) for b in bases
                         for v in W.VOCAB[attr]]).astype(np.float32) / 255.
        expected = np.round(make_grid(want, cols=cols) * 255)
        np.testing.assert_allclose(np.asarray(grid, np.float32), expected, atol=1)


def test_cli_prompt_control_is_off_by_default(monkeypatch, tmp_path, capsys):
    code, out, err, rec = _shapes(monkeypatch, tmp_path, capsys, CliStub())
    assert code == 0 and 'prompt_control' not in rec and 'prompt_control: ' not in out
    assert (rec['settings']['spacing'], rec['settings']['spacing_used']) == ('auto', 'uniform')


def test_cli_prompt_control_usage_errors(monkeypatch, tmp_path, capsys, no_model):
    code, out, err, _ = _shapes(monkeypatch, tmp_path, capsys, None, '--prompt-control', '-1')
    assert code == 2 and err.strip() == 'error: --prompt-control must be >= 0 (bases; 0 = off)'
    assert not (tmp_path / 'e').exists()
    # a model without text -> image: refused after loading it, before any sampling
    stub = CliStub(tasks=('image_variation',))
    code, out, err, _ = _shapes(monkeypatch, tmp_path, capsys, stub, '--prompt-control', '2')
    assert code == 2 and 'error: --prompt-control needs text -> image' in err and not stub.calls
