"""The prompt-control measure on stand-in models: one that draws what the prompt says, and one
whose background comes from the seed (what VD's schedule with eps prediction learns)."""
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
