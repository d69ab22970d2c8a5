"""The demo's examples follow the model it serves: a model trained on the shapes world
(VD-mini) gets held-out captions and renders of that world, any other model the general ones.
(The pages themselves are driven in a real browser in tests/test_demo_browser.py.)"""
import json

from vd_jax.data import shapes
from vd_jax.demo import inputs as inp
from vd_jax.eval.shapes_reader import parse_caption, read_images


def _folder(tmp_path, manifest):
    d = tmp_path / 'ckpt'
    d.mkdir(parents=True)
    if manifest is not None:
        (d / 'manifest.json').write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return str(d)


def test_examples_follow_the_training_data(tmp_path):
    assert inp.examples_for(_folder(tmp_path / 'a', {'data': 'shapes'})) is inp.SHAPES_EXAMPLES
    assert inp.examples_for(_folder(tmp_path / 'b', {'data': 'images'})) is inp.GENERAL_EXAMPLES
    assert inp.examples_for(_folder(tmp_path / 'c', None)) is inp.GENERAL_EXAMPLES
    assert inp.examples_for(_folder(tmp_path / 'd', '{not json')) is inp.GENERAL_EXAMPLES
    assert inp.examples_for('random:tiny:0') is inp.GENERAL_EXAMPLES


def test_shapes_examples_are_held_out_and_say_what_they_show():
    for p in inp.SHAPES_PROMPTS:
        assert shapes.is_heldout(parse_caption(p)), p
    ex = inp.SHAPES_EXAMPLES
    assert len(ex.prompts) >= 3 and len(ex.images) >= 2  # what the tabs index
    images = [inp.example_image(name) for name in ex.images]
    for name, attrs in zip(ex.images, read_images(images)):
        assert shapes.is_heldout(attrs), name
        assert name.startswith(f'{attrs.colour} {attrs.shape} '), (name, attrs)


def test_the_shipped_model_gets_the_shapes_examples():
    from vd_jax.pipeline import MODELS
    assert inp.examples_for(MODELS['vd-mini']) is inp.SHAPES_EXAMPLES
