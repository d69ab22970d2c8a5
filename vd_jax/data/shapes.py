"""The shapes world: 64x64 images of one filled shape on a plain background, with captions.

Everything is generated from the attribute tables below (nothing is downloaded) and is a pure
function of its inputs. Images are anti-aliased: 8x8 point samples per pixel, box-averaged into
a coverage `alpha`, then `round(background * (1 - alpha) + colour * alpha)`.

Geometry (pixel units, x to the right, y down, pixel (row i, column j) covers [j, j+1) x [i, i+1)):
the shape's bounding box is `size` x `size` centred on the position's grid point; circle = the
inscribed disc, square = the box, triangle = apex at the top middle, base along the bottom edge,
cross = a plus sign whose arms are size/3 wide (fill ratio 5/9). The extra shapes (EXTRA_SHAPES,
outside the world) are described where they are defined.

Split rule: with `i_<field>` the value's index in its table, a combination is held out iff
    (i_shape + i_colour + 3 * i_background + 6 * i_size + i_position) % 10 == 0
(174 of the 1728 combinations, each value 19-87 times). Every value, and every pair of values of
two fields, still occurs in training: only whole combinations are new. The samplers of the two
splits draw from disjoint random streams (`default_rng([seed, split id])`).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import re
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vd_jax.data.local_builder import LocalBuilder, prepare_locally
from vd_jax.platform import quiet_tfds

IMAGE_SIZE = 64
SUPERSAMPLE = 8   # render with SUPERSAMPLE x SUPERSAMPLE samples per pixel

SHAPES = ('circle', 'square', 'triangle', 'cross')
# Shapes outside the world (not in SHAPES, VOCAB, the splits or the dataset): renders for
# teaching a trained model something new (docs/lora.md); `coverage` / `render_any` draw them.
# star: five points on the box's inscribed circle, inner vertices at STAR_INNER of its radius.
# diamond: the square turned 45 degrees, its corners at the box's edge midpoints (VD-mini's
# AutoKL gives a small one back as a diamond 71% of the time, a small star never: docs/lora.md).
EXTRA_SHAPES = ('star', 'diamond')
STAR_INNER = 0.5
COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220),
           'yellow': (240, 210, 40), 'purple': (140, 60, 180), 'orange': (245, 140, 30),
           'cyan': (40, 200, 210), 'pink': (240, 120, 180)}
BACKGROUNDS = {'white': (245, 245, 245), 'gray': (128, 128, 128), 'black': (20, 20, 20)}
SIZES = {'small': 16, 'large': 32}                  # side of the bounding box, px
POSITIONS = {'top left': (16, 16), 'top': (32, 16), 'top right': (48, 16),    # centre (x, y), px
             'left': (16, 32), 'center': (32, 32), 'right': (48, 32),
             'bottom left': (16, 48), 'bottom': (32, 48), 'bottom right': (48, 48)}

FIELDS = ('shape', 'colour', 'background', 'size', 'position')
# field -> its value names in table order (the integer label of a value is its index here)
VOCAB = {'shape': SHAPES, 'colour': tuple(COLOURS), 'background': tuple(BACKGROUNDS),
         'size': tuple(SIZES), 'position': tuple(POSITIONS)}
NUM_COMBINATIONS = int(np.prod([len(v) for v in VOCAB.values()]))   # 1728


class Attributes(NamedTuple):
    """One image's attributes as value names; a field is None when unknown (partial readings)."""
    shape: Optional[str] = None
    colour: Optional[str] = None
    background: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None

    def check(self) -> 'Attributes':
        """Self, if every field is a valid name (ValueError naming the field otherwise)."""
        for field, value in zip(FIELDS, self):
            if value not in VOCAB[field]:
                raise ValueError(f'{field}={value!r} is not one of {VOCAB[field]}')
        return self

    def labels(self) -> Tuple[int, ...]:
        """Integer label of each field (index in its table)."""
        return tuple(VOCAB[f].index(v) for f, v in zip(FIELDS, self.check()))

    @property
    def combination(self) -> int:
        """Combination number in [0, 1728): mixed radix over FIELDS, position fastest."""
        return int(np.ravel_multi_index(self.labels(), [len(VOCAB[f]) for f in FIELDS]))

    @classmethod
    def from_combination(cls, number: int) -> 'Attributes':
        """Inverse of `combination`."""
        if not 0 <= number < NUM_COMBINATIONS:
            raise ValueError(f'combination number {number} not in [0, {NUM_COMBINATIONS})')
        labels = np.unravel_index(number, [len(VOCAB[f]) for f in FIELDS])
        return cls(*(VOCAB[f][int(i)] for f, i in zip(FIELDS, labels)))


def is_heldout(attrs: Attributes) -> bool:
    """Whether this combination belongs to the held-out split (rule in the module docstring)."""
    shape, colour, background, size, position = attrs.labels()
    return (shape + colour + 3 * background + 6 * size + position) % 10 == 0


ALL_COMBINATIONS = tuple(Attributes.from_combination(i) for i in range(NUM_COMBINATIONS))
HELDOUT_COMBINATIONS = tuple(a for a in ALL_COMBINATIONS if is_heldout(a))
TRAIN_COMBINATIONS = tuple(a for a in ALL_COMBINATIONS if not is_heldout(a))
SPLITS = {'train': TRAIN_COMBINATIONS, 'heldout': HELDOUT_COMBINATIONS}

# ------------------------------------------------------------------------------------------
# captions
# ------------------------------------------------------------------------------------------

# Each names all five attributes with exactly the table's words; {x_a} is x with its article.
TEMPLATES = (
    'a {size} {colour} {shape} at the {position} on a {background} background',
    '{colour} {shape}, {size}, {position}, {background} background',
    'a {background} background with a {size} {colour} {shape} in the {position}',
    '{colour_a} {shape} of {size} size, placed at the {position}, {background} background',
    '{position}: {size} {colour} {shape} on {background}',
    'the {shape} is {colour} and {size}; it is at the {position} of a {background} background',
)
# every word of the templates that is not an attribute (the caption parser ignores them)
TEMPLATE_WORDS = frozenset(w for t in TEMPLATES
                           for w in re.findall(r'[a-z]+', re.sub(r'\{\w+\}', ' ', t))) | {'an'}


def caption(attrs: Attributes, template: int = 0) -> str:
    """The caption of `attrs` in template number `template` (0 <= template < len(TEMPLATES))."""
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f'template {template} not in [0, {len(TEMPLATES)})')
    words = attrs.check()._asdict()
    article = 'an' if words['colour'][0] in 'aeiou' else 'a'
    return TEMPLATES[template].format(colour_a=f"{article} {words['colour']}", **words)

# ------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------


def coverage(shape: str, cx: float, cy: float, width: float, height: float, *,
             supersample: int = SUPERSAMPLE, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction of each pixel covered by `shape` with bounding box centre (cx, cy), px.

    Returns float32 (image_size, image_size) in [0, 1], from supersample^2 point samples per pixel.
    The reader also uses it with other centres and box sizes (generated shapes are not exact).
    """
    if shape not in SHAPES + EXTRA_SHAPES:
        raise ValueError(f'shape {shape!r} is not one of {SHAPES + EXTRA_SHAPES}')
    ticks = (np.arange(image_size * supersample, dtype=np.float64) + 0.5) / supersample
    u = ((ticks - cx) / (width / 2))[None, :]       # -1..1 across the box
    v = ((ticks - cy) / (height / 2))[:, None]
    au, av = np.abs(u), np.abs(v)
    if shape == 'circle':
        inside = u * u + v * v <= 1
    elif shape == 'square':
        inside = (au <= 1) & (av <= 1)
    elif shape == 'triangle':
        inside = (av <= 1) & (au <= (v + 1) / 2)
    elif shape == 'star':
        inside = _inside_star(u, v)
    elif shape == 'diamond':
        inside = au + av <= 1
    else:  # cross: arms one third of the width
        inside = ((au <= 1 / 3) & (av <= 1)) | ((av <= 1 / 3) & (au <= 1))
    n = image_size
    return inside.reshape(n, supersample, n, supersample).mean((1, 3), dtype=np.float32)


def _inside_star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Points (u (1, N), v (N, 1), box units) inside the five-pointed star (even-odd rule over
    its 10 edges), first point straight up."""
    k = np.arange(10)
    radius = np.where(k % 2 == 0, 1.0, STAR_INNER)
    px, py = radius * np.sin(k * np.pi / 5), -radius * np.cos(k * np.pi / 5)
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    for i in range(10):
        x0, y0, x1, y1 = px[i], py[i], px[(i + 1) % 10], py[(i + 1) % 10]
        if y0 == y1:
            continue
        crosses = (v > min(y0, y1)) & (v <= max(y0, y1))
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


@functools.lru_cache(maxsize=None)
def _alpha(shape: str, size: str, position: str) -> np.ndarray:
    (cx, cy), side = POSITIONS[position], SIZES[size]
    alpha = coverage(shape, cx, cy, side, side)[..., None]
    alpha.flags.writeable = False
    return alpha


def render(attrs: Attributes) -> np.ndarray:
    """The image of `attrs`: uint8 (64, 64, 3). Exact palette values where a pixel is fully
    inside the shape (colour) or fully outside (background)."""
    return _render(*attrs.check())


def render_any(attrs: Attributes) -> np.ndarray:
    """`render` that also draws the EXTRA_SHAPES (every other field checked as in the world)."""
    if attrs.shape not in EXTRA_SHAPES:
        return render(attrs)
    attrs._replace(shape=SHAPES[0]).check()
    return _render(*attrs)


def caption_any(attrs: Attributes, template: int = 0) -> str:
    """`caption` that also names the EXTRA_SHAPES."""
    if attrs.shape not in EXTRA_SHAPES:
        return caption(attrs, template)
    text = caption(attrs._replace(shape=SHAPES[0]), template)
    return re.sub(rf'\b{SHAPES[0]}\b', attrs.shape, text)


def _render(shape, colour, background, size, position) -> np.ndarray:
    alpha = _alpha(shape, size, position)
    fg, bg = np.array(COLOURS[colour], np.float32), np.array(BACKGROUNDS[background], np.float32)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)

# ------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------


class Sample(NamedTuple):
    """One record: its attributes, caption template number and caption."""
    attrs: Attributes
    template: int
    caption: str


def iterate(split: str, seed: int = 0) -> Iterator[Sample]:
    """Endless samples of a split (a generator; seed >= 0).

    train: independent uniform draws of a training combination and a template.
    heldout: passes over all held-out combinations, each pass in a new random order; in pass p
      the c-th held-out combination gets template (c + p + seed) % 6, so the first 6 * 174
      samples hold every (combination, template) pair exactly once.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {tuple(SPLITS)}")
    if seed < 0:
        raise ValueError(f'seed must be >= 0, got {seed}')
    return _samples(split, seed)


def _samples(split: str, seed: int) -> Iterator[Sample]:
    combos = SPLITS[split]
    rng = np.random.default_rng([seed, tuple(SPLITS).index(split)])
    if split == 'train':
        while True:
            c, t = int(rng.integers(len(combos))), int(rng.integers(len(TEMPLATES)))
            yield Sample(combos[c], t, caption(combos[c], t))
    for p in itertools.count():
        for c in rng.permutation(len(combos)):
            t = int((c + p + seed) % len(TEMPLATES))
            yield Sample(combos[c], t, caption(combos[c], t))


def sample(split: str, n: int, seed: int = 0) -> List[Sample]:
    """The first `n` samples of `iterate(split, seed)`."""
    if n < 0:
        raise ValueError(f'n must be >= 0, got {n}')
    return list(itertools.islice(iterate(split, seed), n))

# ------------------------------------------------------------------------------------------
# the tfds builder (ArrayRecord, no TensorFlow), read like any vd_jax dataset
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """num_train / num_heldout: records of each split (`sample(split, n, seed)`)."""
    num_train: int = 10_000
    num_heldout: int = len(TEMPLATES) * len(HELDOUT_COMBINATIONS)
    seed: int = 0


class ShapesWorld(LocalBuilder):
    """tfds builder of the shapes world, splits 'train' and 'heldout'. See `build_shapes`.

    Record (`as_data_source()[split][i]`):
      image     uint8 (64, 64, 3), exactly `render(attrs)` (stored as PNG)
      caption   bytes (utf-8)
      id        bytes '<split>/<sample number:07d>' (tfds stores records shuffled by it)
      template  int32, the caption's template number
      shape, colour, background, size, position   int64 label: index in VOCAB[field]
    """
    def _info(self) -> tfds.core.DatasetInfo:
        labels = {f: tfds.features.ClassLabel(names=VOCAB[f]) for f in FIELDS}
        return tfds.core.DatasetInfo(
            builder=self, description='The shapes world: one captioned shape per 64x64 image.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                'caption': tfds.features.Text(), 'id': tfds.features.Text(),
                'template': tfds.features.Scalar(np.int32), **labels}))

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        cfg = self.builder_config
        return {'train': self._generate_examples('train', cfg.num_train),
                'heldout': self._generate_examples('heldout', cfg.num_heldout)}

    def _generate_examples(self, split: str, n: int):
        for i, s in enumerate(sample(split, n, self.builder_config.seed)):
            buf = io.BytesIO()
            Image.fromarray(render(s.attrs)).save(buf, format='PNG')
            uid = f'{split}/{i:07d}'
            yield uid, {'image': buf.getvalue(), 'caption': s.caption, 'id': uid,
                        'template': np.int32(s.template), **dict(zip(FIELDS, s.attrs.labels()))}

    def build_message(self) -> str:
        return f'generating the shapes world in {self.data_dir}'

    def done_message(self) -> str:
        return f'shapes world ready in {self.data_dir}'


def build_shapes(data_dir: str, num_train: int = 10_000, num_heldout: Optional[int] = None,
                 seed: int = 0) -> ShapesWorld:
    """Build (or reuse) `<data_dir>/shapes_world/n<num_train>_h<num_heldout>_s<seed>/1.0.0`.

    Args:
      data_dir: tfds data_dir.
      num_train, num_heldout: records per split (> 0); num_heldout defaults to 6 * 174, every
        held-out combination with every template once.
      seed: sampling seed (>= 0).
    Returns:
      the prepared builder: `builder.as_data_source()['train' | 'heldout']`, or pass it (with
      split=...) to `make_loader`.
    """
    num_heldout = ShapesConfig.num_heldout if num_heldout is None else num_heldout
    if min(num_train, num_heldout) <= 0 or seed < 0:
        raise ValueError(f'need num_train > 0, num_heldout > 0 and seed >= 0, got {num_train}, '
                         f'{num_heldout} and {seed}')
    config = ShapesConfig(name=f'n{num_train}_h{num_heldout}_s{seed}', num_train=num_train,
                          num_heldout=num_heldout, seed=seed)
    with quiet_tfds():
        builder = ShapesWorld(config=config, data_dir=data_dir, file_format='array_record')
        prepared = builder.is_prepared()
    if not prepared:
        prepare_locally(builder, data_dir)
    return builder
