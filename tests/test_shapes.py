"""The shapes world (vd_jax.data.shapes) and its readers (vd_jax.eval.shapes_reader)."""
import collections
import io
import itertools
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vd_jax import data as vdd
from vd_jax.data import shapes as sw
from vd_jax.eval import shapes_reader as rd

A = sw.Attributes


# ------------------------------------------------------------------------------------------
# the world
# ------------------------------------------------------------------------------------------

def test_tables_and_combination_numbers():
    assert [len(sw.VOCAB[f]) for f in sw.FIELDS] == [4, 8, 3, 2, 9]
    assert sw.NUM_COMBINATIONS == len(set(sw.ALL_COMBINATIONS)) == 1728
    for i in (0, 1, 9, 1000, 1727):
        assert sw.Attributes.from_combination(i).combination == i
    assert A('circle', 'red', 'white', 'small', 'top left').combination == 0
    assert A('circle', 'red', 'white', 'small', 'top').combination == 1   # position fastest
    with pytest.raises(ValueError, match="colour='magenta'"):
        sw.render(A('circle', 'magenta', 'white', 'small', 'top'))
    with pytest.raises(ValueError, match='1728'):
        sw.Attributes.from_combination(1728)


def test_render_exact_palette_at_centre_and_background_away_from_the_shape():
    for a in sw.ALL_COMBINATIONS:
        img = sw.render(a)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        (cx, cy), fg, bg = sw.POSITIONS[a.position], sw.COLOURS[a.colour], sw.BACKGROUNDS[a.background]
        # the 2x2 pixels around the box centre (cx, cy) lie inside every shape
        assert (img[cy - 1:cy + 1, cx - 1:cx + 1] == fg).all(), a
        far = (0 if cy > 32 else 63, 0 if cx > 32 else 63)     # the corner opposite the shape
        assert tuple(img[far]) == bg, a
        if a.size == 'small':
            assert all(tuple(img[i, j]) == bg for i in (0, 63) for j in (0, 63)), a


def test_render_is_deterministic_and_not_shared():
    a = A('triangle', 'orange', 'gray', 'large', 'bottom right')
    x, y = sw.render(a), sw.render(a)
    np.testing.assert_array_equal(x, y)
    x[...] = 0      # the caller owns its copy; the cache is untouched
    np.testing.assert_array_equal(sw.render(a), y)


@pytest.mark.parametrize('shape', sw.SHAPES)
def test_render_box_size_and_centre(shape):
    for size, position in itertools.product(sw.SIZES, sw.POSITIONS):
        img = sw.render(A(shape, 'red', 'white', size, position))
        mask = img[..., 1] < (40 + 245) / 2     # green channel: red 40, white 245; alpha > 0.5
        ys, xs = np.nonzero(mask)
        side, (cx, cy) = sw.SIZES[size], sw.POSITIONS[position]
        w, h = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
        # the triangle's apex row is only 1/4 covered: its outline is one row short
        assert w == side and h == side - (shape == 'triangle'), (shape, size, position, w, h)
        assert abs((xs.min() + xs.max() + 1) / 2 - cx) <= 0.5
        assert abs((ys.min() + ys.max() + 1) / 2 - cy) <= 0.5 + (shape == 'triangle') * 0.5


def test_render_is_antialiased_coverage():
    """Edges are partial coverage (colours between background and shape on the line between
    them), and the coverage adds up to the shapes' areas."""
    areas = {'circle': np.pi / 4, 'square': 1.0, 'triangle': 0.5, 'cross': 5 / 9}
    fg, bg = np.array(sw.COLOURS['blue'], float), np.array(sw.BACKGROUNDS['white'], float)
    for shape, fill in areas.items():
        img = sw.render(A(shape, 'blue', 'white', 'large', 'center')).astype(float)
        alpha = ((img - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        np.testing.assert_allclose(bg + alpha[..., None] * (fg - bg), img, atol=0.9)  # rounding
        # 8x8 point samples place each edge within 1/16 px: <= 1% of these areas
        np.testing.assert_allclose(alpha.sum(), fill * 32 ** 2, rtol=1e-2)
        partial = ((alpha > 0.05) & (alpha < 0.95)).sum()
        if shape == 'square':        # its edges lie on pixel boundaries
            assert partial == 0
        else:
            assert partial >= 20, shape


def test_split_is_disjoint_covering_and_balanced():
    train, held = set(sw.TRAIN_COMBINATIONS), set(sw.HELDOUT_COMBINATIONS)
    assert not train & held and train | held == set(sw.ALL_COMBINATIONS)
    assert len(held) == 174
    for i, j in itertools.combinations(range(5), 2):   # every value and every pair is trained
        pairs = {(a[i], a[j]) for a in train}
        assert len(pairs) == len(sw.VOCAB[sw.FIELDS[i]]) * len(sw.VOCAB[sw.FIELDS[j]])
    for i, f in enumerate(sw.FIELDS):                  # and every value is tested
        counts = collections.Counter(a[i] for a in held)
        assert set(counts) == set(sw.VOCAB[f]) and min(counts.values()) >= 19
    # the rule as documented
    for a in sw.ALL_COMBINATIONS:
        s, c, b, z, p = a.labels()
        assert sw.is_heldout(a) == ((s + c + 3 * b + 6 * z + p) % 10 == 0)


def test_sampling_is_deterministic_and_respects_the_split():
    t1, t2 = sw.sample('train', 300, seed=5), sw.sample('train', 300, seed=5)
    assert t1 == t2 and t1 != sw.sample('train', 300, seed=6)
    assert all(not sw.is_heldout(s.attrs) for s in t1)
    assert all(s.caption == sw.caption(s.attrs, s.template) for s in t1)
    assert {s.template for s in t1} == set(range(len(sw.TEMPLATES)))
    held = sw.sample('heldout', 6 * 174, seed=5)
    assert held == sw.sample('heldout', 6 * 174, seed=5)
    # one pass = every held-out combination once; 6 passes = every (combination, template) once
    assert {s.attrs for s in held[:174]} == set(sw.HELDOUT_COMBINATIONS)
    assert len({(s.attrs, s.template) for s in held}) == 6 * 174
    with pytest.raises(ValueError, match='split'):
        sw.sample('test', 1)
    with pytest.raises(ValueError, match='seed'):
        sw.iterate('train', seed=-1)


def test_captions_name_every_attribute_in_every_template():
    a = A('circle', 'red', 'black', 'large', 'top left')
    assert sw.caption(a, 0) == 'a large red circle at the top left on a black background'
    assert sw.caption(a, 1) == 'red circle, large, top left, black background'
    assert len(set(sw.TEMPLATES)) == len(sw.TEMPLATES) >= 4
    assert sw.caption(A('cross', 'orange', 'gray', 'small', 'center'), 3).startswith('an orange')
    vocabulary = {w for vs in sw.VOCAB.values() for v in vs for w in v.split()}
    assert not vocabulary & sw.TEMPLATE_WORDS      # filler words never look like attributes
    for a in sw.ALL_COMBINATIONS[::37]:
        for t in range(len(sw.TEMPLATES)):
            text = sw.caption(a, t)
            for value in a:
                assert re.search(rf'\b{value}\b', text), (value, text)
    with pytest.raises(ValueError, match='template 6'):
        sw.caption(a, 6)

# ------------------------------------------------------------------------------------------
# caption parser
# ------------------------------------------------------------------------------------------


def test_parse_caption_reads_every_template_of_every_combination():
    wrong = [(a, t) for a in sw.ALL_COMBINATIONS for t in range(len(sw.TEMPLATES))
             if rd.parse_caption(sw.caption(a, t)) != a]
    assert not wrong, wrong[:5]


def test_parse_caption_is_tolerant():
    a = A('cross', 'pink', 'gray', 'small', 'bottom right')
    for text in ['  A  SMALL pink Cross, at the bottom-right... on grey background!! ',
                 'small pink cross bottom right gray background',
                 'gray background; bottom right: the pink small cross',
                 'right bottom pink cross small on a a gray background',
                 'a smal pinc crosss at the botom right on a gray backround',   # one typo each
                 'pink crosses, small, bottom right, gray']:
        assert rd.parse_caption(text) == a, text
    assert rd.parse_caption('a large red circle in the centre') == A('circle', 'red', None, 'large',
                                                                     'center')
    assert rd.parse_caption('top center, blue square') == A('square', 'blue', None, None, 'top')
    # missing or contradictory: None for that field only
    assert rd.parse_caption('') == A()
    assert rd.parse_caption('a bright light, nothing else') == A()    # not typos of 'right'
    assert rd.parse_caption('a red blue circle at the top bottom left') == A('circle', None, None,
                                                                            None, None)
    assert rd.parse_caption('white square on a black background').background == 'black'
    assert rd.parse_caption('a small large square').size is None
    with pytest.raises(TypeError, match='str'):
        rd.parse_caption(None)

# ------------------------------------------------------------------------------------------
# pixel reader
# ------------------------------------------------------------------------------------------


def _blur(img, rng):
    return ndimage.gaussian_filter(img.astype(np.float32), (1, 1, 0), mode='nearest')


def _noise(img, rng):
    return img + rng.normal(0, 10, img.shape)


def _shift(img, rng):
    return img.astype(np.float32) + rng.integers(-15, 16, 3)


def _jpeg(img, rng):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='JPEG', quality=75)
    return np.asarray(Image.open(buf))


def _uint8(x):
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_reader_reads_heldout_and_train_renders():
    held = list(sw.HELDOUT_COMBINATIONS)
    train = [s.attrs for s in sw.sample('train', 300, seed=1)]
    for attrs in (held, train):
        acc = rd.attribute_accuracy(rd.read_images(np.stack([sw.render(a) for a in attrs])), attrs)
        assert min(acc.values()) >= 0.99, acc      # measured: 1.0 everywhere
    attrs, confidence = rd.read_image(sw.render(held[0]), return_confidence=True)
    assert attrs == held[0] and confidence > 0.9


@pytest.mark.parametrize('perturb', [_blur, _noise, _shift, _jpeg,
                                     lambda x, r: _shift(_noise(_blur(x, r), r), r)],
                         ids=['blur1', 'noise10', 'shift15', 'jpeg75', 'all3'])
def test_reader_is_robust_to_perturbations(perturb):
    """Blur sigma 1 px, noise sigma 10/255, colour shift +-15, JPEG q75, held-out renders."""
    rng = np.random.default_rng(0)
    held = list(sw.HELDOUT_COMBINATIONS)
    images = np.stack([_uint8(perturb(sw.render(a), rng)) for a in held])
    acc = rd.attribute_accuracy(rd.read_images(images), held)
    assert min(acc.values()) >= 0.98, acc          # measured: 1.0 everywhere


def test_reader_handles_off_grid_and_resized_shapes():
    """Generated shapes are not exact: shifted 3 px, 15% off size, blurred and noisy."""
    rng = np.random.default_rng(1)
    held = list(sw.HELDOUT_COMBINATIONS)
    images = []
    for a in held:
        (cx, cy), side = sw.POSITIONS[a.position], sw.SIZES[a.size]
        alpha = sw.coverage(a.shape, cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3),
                            side * rng.uniform(0.85, 1.15), side * rng.uniform(0.85, 1.15))
        fg, bg = np.array(sw.COLOURS[a.colour]), np.array(sw.BACKGROUNDS[a.background])
        images.append(_uint8(_noise(_blur(bg + alpha[..., None] * (fg - bg), rng), rng)))
    acc = rd.attribute_accuracy(rd.read_images(np.stack(images)), held)
    assert min(acc.values()) >= 0.98, acc          # measured: 1.0 everywhere


def test_reader_inputs_and_blank_images():
    a = A('square', 'cyan', 'black', 'large', 'left')
    img = sw.render(a)
    assert rd.read_image(img.astype(np.float32) / 255) == a
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert rd.read_image(blank, return_confidence=True) == (A(background='gray'), 0.0)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert rd.read_image(noise, return_confidence=True)[1] < 0.5     # no shape in there
    with pytest.raises(ValueError, match=r'\(64, 64, 3\)'):
        rd.read_image(img[:32])
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        rd.read_image(img.astype(np.float32) / 127.5 - 1 - 0.6)
    with pytest.raises(ValueError, match='batch'):
        rd.read_images(img)


def test_attribute_accuracy():
    t = [A('circle', 'red', 'white', 'small', 'top'), A('cross', 'blue', 'black', 'large', 'left')]
    p = [A('circle', 'red', 'white', 'small', 'top'), A('cross', None, 'black', 'small', 'left')]
    assert rd.attribute_accuracy(p, t) == {'shape': 1.0, 'colour': 0.5, 'background': 1.0,
                                           'size': 0.5, 'position': 1.0, 'all': 0.5}
    with pytest.raises(ValueError, match='2 true'):
        rd.attribute_accuracy(p[:1], t)

# ------------------------------------------------------------------------------------------
# tfds builder and loader
# ------------------------------------------------------------------------------------------


def _attrs(record):
    return A(*(sw.VOCAB[f][int(record[f])] for f in sw.FIELDS))


def test_builder_round_trip_and_loader(tmp_path, capsys):
    builder = sw.build_shapes(str(tmp_path), num_train=40, num_heldout=30, seed=3)
    assert 'Downloading and preparing' not in capsys.readouterr().out
    sources = builder.as_data_source()
    for split, n in (('train', 40), ('heldout', 30)):
        expected = sw.sample(split, n, seed=3)
        source = sources[split]
        assert len(source) == n
        for i in range(n):
            r = source[i]
            k = int(r['id'].decode().split('/')[1])
            assert r['id'].decode() == f'{split}/{k:07d}'
            a = _attrs(r)
            assert (a, int(r['template']), r['caption'].decode()) == tuple(expected[k])
            np.testing.assert_array_equal(r['image'], sw.render(a))
            assert sw.is_heldout(a) == (split == 'heldout')
    # the repo's readers: open_dataset and the grain loader (uint8, no crop, one epoch)
    held = vdd.open_dataset(builder.data_dir, 'heldout')
    assert len(held) == 30
    loader = vdd.make_loader(builder, split='heldout', batch_size=10, image_size=64, shuffle=False,
                             num_epochs=1, random_crop=False, scale=False, process_index=0,
                             process_count=1)
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert batch['image'].shape == (10, 64, 64, 3) and batch['image'].dtype == np.uint8
        for img, text, *labels in zip(batch['image'], batch['caption'],
                                      *(batch[f] for f in sw.FIELDS)):
            a = A(*(sw.VOCAB[f][int(v)] for f, v in zip(sw.FIELDS, labels)))
            np.testing.assert_array_equal(img, sw.render(a))
            assert rd.parse_caption(str(text)) == a
    # the same arguments reuse the prepared dataset
    again = sw.build_shapes(str(tmp_path), num_train=40, num_heldout=30, seed=3)
    assert again.data_dir == builder.data_dir
    with pytest.raises(ValueError, match='num_train'):
        sw.build_shapes(str(tmp_path), num_train=0)
