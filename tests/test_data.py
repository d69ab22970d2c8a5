"""Input pipeline: tfds ArrayRecord builder (no TF), LAION filters, grain loader, pre-encoding."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from vd_jax import data as vdd
from vd_jax.errors import DataSourceError

SIZE = 16  # training crop side in the loader tests


# ----------------------------------------------------------------------------------------
# fixtures: a folder and tar shards with one sample per filter / failure
# ----------------------------------------------------------------------------------------

def _image(seed, h, w):
    """Smooth-ish RGB uint8 (so JPEG error stays small), distinct per seed."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BILINEAR))
    return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def _psnr(x, y):
    mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


# JPEG q95 (4:2:0) of our noisy fixture images measures 32-33 dB; any decoding mistake (channel
# order, transposition, a shifted row, the wrong image) drops far below 20 dB.
JPEG_MIN_PSNR = 30.0


def _encode(arr, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


# Every score present and passing, original size big enough: the metadata of a kept sample.
GOOD = dict(similarity=0.35, punsafe=0.1, pwatermark=0.1, original_width=640, original_height=480)


def _write_folder(root):
    """Loose images. Expected: kept a.png, b.jpg, c.png, k.png, sub/l.png; one drop per reason."""
    os.makedirs(os.path.join(root, 'sub'))
    arrays = {}

    def put(name, arr, fmt, caption=None, **kw):
        with open(os.path.join(root, name), 'wb') as f:
            f.write(_encode(arr, fmt, **kw))
        arrays[name] = arr
        if caption is not None:
            with open(os.path.join(root, os.path.splitext(name)[0] + '.txt'), 'w') as f:
                f.write(caption + '\n')

    # no metadata at all: the stored size (256x192, area exactly 256^2*0.75) is used
    put('a.png', _image(1, 192, 256), 'PNG', 'a red cat')
    put('b.jpg', _image(2, 256, 192), 'JPEG', 'a blue dog', quality=95)
    put('k.png', _image(3, 224, 224)[..., 0], 'PNG', 'grey')          # mode L -> RGB
    put('j.png', _image(4, 224, 224), 'PNG')                          # no caption anywhere
    valid = _encode(_image(5, 224, 224), 'JPEG')
    with open(os.path.join(root, 'i.jpg'), 'wb') as f:                # truncated JPEG
        f.write(valid[:len(valid) // 2])
    with open(os.path.join(root, 'i.txt'), 'w') as f:
        f.write('corrupt')
    # small stored images whose metadata carries the original size
    lines = []
    for name, seed, meta in [('c.png', 6, GOOD),
                             ('d.png', 7, dict(GOOD, similarity=0.25)),
                             ('e.png', 8, dict(GOOD, punsafe=0.5)),
                             ('f.png', 9, dict(GOOD, pwatermark=0.9)),
                             ('g.png', 10, dict(GOOD, original_width=1000, original_height=400)),
                             ('h.png', 11, dict(GOOD, original_width=200, original_height=200))]:
        put(name, _image(seed, 24, 32), 'PNG')
        lines.append(json.dumps(dict(meta, file_name=name, text=f'caption of {name}')))
    lines.append(json.dumps(dict(GOOD, file_name='missing.png', text='no such file')))
    lines.append('{not json')
    with open(os.path.join(root, 'metadata.jsonl'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    put('sub/l.png', _image(12, 20, 20), 'PNG')
    with open(os.path.join(root, 'sub', 'captions.jsonl'), 'w') as f:
        f.write(json.dumps(dict(GOOD, file_name='l.png', text='in a subfolder')) + '\n')
    return arrays


def _add(tar, name, payload):
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload).encode()
    elif isinstance(payload, str):
        payload = payload.encode()
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write_shards(root):
    """img2dataset-style shards. Expected kept: 00000/{0,2}, 00001/{0,1}, 00002/0."""
    os.makedirs(root)
    arrays = {}
    jpg = {k: _image(20 + k, 32, 32) for k in range(8)}
    with tarfile.open(os.path.join(root, '00000.tar'), 'w') as tar:
        _add(tar, '000000000.jpg', _encode(jpg[0], 'JPEG', quality=95))
        _add(tar, '000000000.txt', 'tar sample zero')
        _add(tar, '000000000.json', dict(GOOD, key='000000000', url='http://x/0.jpg'))
        _add(tar, '000000001.png', _encode(jpg[1], 'PNG'))
        _add(tar, '000000001.txt', 'unsafe')
        _add(tar, '000000001.json', dict(GOOD, punsafe=0.6))
        _add(tar, '000000002.jpg', _encode(jpg[2], 'JPEG', quality=95))   # caption only in json
        _add(tar, '000000002.json', dict(GOOD, caption='caption from json'))
        _add(tar, '000000003.txt', 'no image')                            # failed download
        _add(tar, '000000003.json', GOOD)
        _add(tar, '000000004.jpg', b'\xff\xd8\xff garbage')               # corrupt bytes
        _add(tar, '000000004.txt', 'corrupt')
        _add(tar, '000000004.json', GOOD)
    arrays['00000.tar/000000000'] = jpg[0]
    with tarfile.open(os.path.join(root, '00001.tar'), 'w') as tar:   # key files not adjacent
        _add(tar, '000010001.txt', 'second of shard one')
        _add(tar, '000010000.png', _encode(jpg[3], 'PNG'))
        _add(tar, '000010001.png', _encode(jpg[4], 'PNG'))
        _add(tar, '000010000.txt', 'first of shard one')
        _add(tar, '000010000.json', GOOD)
        _add(tar, '000010001.json', GOOD)
    arrays['00001.tar/000010000'] = jpg[3]
    arrays['00001.tar/000010001'] = jpg[4]
    # a shard cut short inside its second image: the first sample survives
    path = os.path.join(root, '00002.tar')
    with tarfile.open(path, 'w') as tar:
        _add(tar, '000020000.png', _encode(jpg[5], 'PNG'))
        _add(tar, '000020000.txt', 'before the damage')
        _add(tar, '000020000.json', GOOD)
        _add(tar, '000020001.txt', 'in the damage')
        _add(tar, '000020001.png', _encode(_image(99, 256, 256), 'PNG'))
    with open(path, 'rb') as f:
        blob = f.read()
    with open(path, 'wb') as f:
        f.write(blob[:len(blob) - 80_000])
    arrays['00002.tar/000020000'] = jpg[5]
    return arrays


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp('data')
    folder = _write_folder(str(base / 'images'))
    shards = _write_shards(str(base / 'shards'))
    builder = vdd.build_image_text([str(base / 'images'), str(base / 'shards' / '*.tar')],
                                   str(base / 'tfds'), name='fixture')
    source = builder.as_data_source()['train']
    by_id = {}
    for i in range(len(source)):
        r = source[i]
        by_id[r['id'].decode()] = r
    return dict(base=base, builder=builder, source=source, by_id=by_id,
                folder=folder, shards=shards)


# ----------------------------------------------------------------------------------------
# builder
# ----------------------------------------------------------------------------------------

def test_builder_keeps_exactly_the_good_samples(built):
    assert sorted(built['by_id']) == sorted([
        'images/a.png', 'images/b.jpg', 'images/c.png', 'images/k.png', 'images/sub/l.png',
        'shards/00000.tar/000000000', 'shards/00000.tar/000000002',
        'shards/00001.tar/000010000', 'shards/00001.tar/000010001',
        'shards/00002.tar/000020000'])


def test_builder_counts_every_filter_and_skip(built):
    stats = vdd.prepare_stats(built['builder'])
    expected = {
        'kept': 10,
        'filtered/similarity': 1,       # d.png
        'filtered/punsafe': 2,          # e.png, tar 000000001
        'filtered/pwatermark': 1,       # f.png
        'filtered/aspect_ratio': 1,     # g.png (1000x400)
        'filtered/min_area': 1,         # h.png (200x200)
        'skipped/corrupt_image': 3,     # i.jpg, tar 000000004, the truncated tar's 2nd image
        'skipped/missing_caption': 1,   # j.png
        'skipped/missing_image': 2,     # jsonl line for missing.png, tar 000000003
        'skipped/bad_metadata': 1,      # the '{not json' line
        'skipped/corrupt_shard': 1,     # 00002.tar
        # no scores: a.png, b.jpg, k.png and i.jpg (scores are checked before decoding; j.png
        # stops earlier, at its missing caption)
        'unchecked/similarity': 4, 'unchecked/punsafe': 4, 'unchecked/pwatermark': 4,
    }
    # every sample is seen once and counted under exactly one outcome
    expected['seen'] = sum(v for k, v in expected.items()
                           if k == 'kept' or k.startswith(('filtered/', 'skipped/'))
                           and k not in ('skipped/bad_metadata', 'skipped/corrupt_shard'))
    assert stats == expected
    # persisted with the dataset, readable without the builder class
    path = built['builder'].data_dir
    with open(os.path.join(path, 'metadata.json')) as f:
        assert json.load(f)['counts'] == expected


def test_builder_round_trips_pixels_and_fields(built):
    by_id, folder, shards = built['by_id'], built['folder'], built['shards']
    # PNG: stored bytes are the file's, decoded pixels identical
    a = by_id['images/a.png']
    np.testing.assert_array_equal(a['image'], folder['a.png'])
    assert a['caption'] == b'a red cat'
    assert (a['original_width'], a['original_height']) == (256, 192)
    assert all(np.isnan(a[k]) for k in ('similarity', 'punsafe', 'pwatermark'))
    # JPEG q95: lossy, but close, and equal to PIL's own decode of the file
    b = by_id['images/b.jpg']
    assert b['image'].shape == (256, 192, 3)
    assert _psnr(b['image'], folder['b.jpg']) > JPEG_MIN_PSNR
    with Image.open(os.path.join(built['base'], 'images', 'b.jpg')) as im:
        np.testing.assert_array_equal(b['image'], np.asarray(im))
    # grey PNG -> RGB, each channel the grey value
    k = by_id['images/k.png']
    np.testing.assert_array_equal(k['image'], np.repeat(folder['k.png'][..., None], 3, -1))
    # metadata fields and the original size from the jsonl
    c = by_id['images/c.png']
    assert c['caption'] == b'caption of c.png'
    np.testing.assert_allclose([c['similarity'], c['punsafe'], c['pwatermark']],
                               [0.35, 0.1, 0.1], rtol=1e-6)
    assert (c['original_width'], c['original_height']) == (640, 480)
    np.testing.assert_array_equal(c['image'], folder['c.png'])
    assert by_id['images/sub/l.png']['caption'] == b'in a subfolder'
    # tar samples
    t0 = by_id['shards/00000.tar/000000000']
    assert t0['caption'] == b'tar sample zero' and t0['url'] == b'http://x/0.jpg'
    assert _psnr(t0['image'], shards['00000.tar/000000000']) > JPEG_MIN_PSNR
    assert by_id['shards/00000.tar/000000002']['caption'] == b'caption from json'
    for key in ('00001.tar/000010000', '00001.tar/000010001', '00002.tar/000020000'):
        np.testing.assert_array_equal(by_id['shards/' + key]['image'], shards[key])
    assert by_id['shards/00001.tar/000010001']['caption'] == b'second of shard one'


def test_builder_reopens_and_feeds_the_loader(built):
    source = vdd.open_dataset(built['builder'].data_dir)
    assert len(source) == 10
    batch = next(iter(vdd.make_loader(source, batch_size=10, image_size=SIZE, seed=0,
                                      process_index=0, process_count=1)))
    assert batch['image'].shape == (10, SIZE, SIZE, 3) and batch['image'].dtype == np.float32
    assert sorted(batch['id']) == sorted(built['by_id'])
    assert batch['caption'].dtype.kind == 'U'


@pytest.mark.slow
def test_builder_workers_and_filter_options(built, tmp_path):
    base = built['base']
    # 2 spawn workers, no filters: same records as in-process, plus the 6 filtered samples
    builder = vdd.build_image_text([str(base / 'images'), str(base / 'shards')], str(tmp_path),
                                   name='nofilter', filters=vdd.Filters.none(), num_workers=2,
                                   chunk_size=3)
    stats = vdd.prepare_stats(builder)
    assert stats['kept'] == 16 and not any(k.startswith('filtered/') for k in stats)
    source = builder.as_data_source()['train']
    ids = {source[i]['id'].decode(): source[i] for i in range(len(source))}
    assert set(built['by_id']) < set(ids)
    for uid, r in built['by_id'].items():
        np.testing.assert_array_equal(ids[uid]['image'], r['image'])
    # thresholds are configurable: a looser similarity bound keeps d.png (0.25)
    builder = vdd.build_image_text(str(base / 'images'), str(tmp_path), name='loose',
                                   filters=vdd.Filters(min_similarity=0.2))
    assert vdd.prepare_stats(builder)['kept'] == 6
    # reused when asked again the same; refused when the same name means other inputs
    again = vdd.build_image_text(str(base / 'images'), str(tmp_path), name='loose',
                                 filters=vdd.Filters(min_similarity=0.2))
    assert vdd.prepare_stats(again) == vdd.prepare_stats(builder)
    with pytest.raises(ValueError, match='use another name'):
        vdd.build_image_text(str(base / 'images'), str(tmp_path), name='loose')
    with pytest.raises(FileNotFoundError, match='nowhere'):
        vdd.build_image_text(str(base / 'nowhere'), str(tmp_path), name='bad')


def test_unusable_folders_fail_before_anything_is_written(tmp_path):
    data_dir = tmp_path / 'data'
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DataSourceError, match=f"no images in '{empty}' \\(it is empty\\)"):
        vdd.build_image_text(str(empty), str(data_dir))
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'notes.md').write_text('x')
    with pytest.raises(DataSourceError, match=r'no images .*1 other file: notes\.md'):
        vdd.build_image_text(str(other), str(data_dir))
    nocap = tmp_path / 'nocap'
    nocap.mkdir()
    for i in range(3):
        (nocap / f'photo{i}.jpg').write_bytes(_encode(_image(i, 32, 32), 'JPEG'))
    with pytest.raises(DataSourceError) as e:
        vdd.build_image_text(str(nocap), str(data_dir))
    assert str(nocap) in str(e.value)
    assert '3 images but no captions' in str(e.value)
    assert 'photo0.txt beside photo0.jpg' in str(e.value) and 'metadata.jsonl' in str(e.value)
    assert isinstance(e.value, ValueError)
    assert not data_dir.exists()
    # a caption anywhere (a side file, or a jsonl line) passes the check
    (nocap / 'photo1.txt').write_text('a photo')
    assert vdd.check_sources(str(nocap)) == dict(images=3, captioned=1, tar_shards=0)
    (nocap / 'photo1.txt').unlink()
    (nocap / 'metadata.jsonl').write_text(json.dumps(dict(file_name='photo2.jpg', text='x')) + '\n')
    assert vdd.check_sources(str(nocap))['captioned'] == 1


def test_failed_build_leaves_no_folders_and_tfds_stays_quiet(tmp_path, capfd, caplog):
    caplog.set_level('INFO')
    small = tmp_path / 'small'     # captioned, but every image is below the LAION min area
    small.mkdir()
    for i in range(2):
        (small / f'p{i}.png').write_bytes(_encode(_image(i, 16, 16), 'PNG'))
        (small / f'p{i}.txt').write_text(f'caption {i}')
    data_dir = tmp_path / 'data'
    with pytest.raises(DataSourceError, match="no usable sample.*'filtered/min_area': 2"):
        vdd.build_image_text(str(small), str(data_dir))
    assert not data_dir.exists()   # tfds had started: its folders are removed again
    (data_dir / 'keep').mkdir(parents=True)   # an existing data dir survives a failed build
    with pytest.raises(DataSourceError):
        vdd.build_image_text(str(small), str(data_dir))
    assert sorted(os.listdir(data_dir)) == ['keep']
    builder = vdd.build_image_text(str(small), str(data_dir), filters=vdd.Filters.none())
    assert vdd.prepare_stats(builder) == {'kept': 2, 'seen': 2}
    assert sorted(os.listdir(data_dir)) == ['keep', 'vd_image_text']   # no empty downloads/
    out = capfd.readouterr()
    # nothing is downloaded, and our config is not dumped as a warning
    assert 'Downloading and preparing' not in out.out + out.err
    assert 'Using custom data configuration' not in caplog.text
    assert 'building vd_image_text/default' in caplog.text


# ----------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------

def _take(loader, n, it=None):
    it = iter(loader) if it is None else it
    return [next(it) for _ in range(n)], it


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


SYN = vdd.SyntheticImageSource(36, [(24, 40), (48, 20), (16, 16)], seed=3)


def _loader(**kw):
    args = dict(batch_size=4, image_size=SIZE, seed=7, process_index=0, process_count=1)
    args.update(kw)
    return vdd.make_loader(SYN, **args)


@pytest.mark.slow
def test_loader_is_deterministic_for_a_seed():
    a, _ = _take(_loader(), 4)
    b, _ = _take(_loader(), 4)
    _assert_batches_equal(a, b)
    assert a[0]['image'].shape == (4, SIZE, SIZE, 3) and a[0]['image'].dtype == np.float32
    assert -1.0 <= a[0]['image'].min() and a[0]['image'].max() <= 1.0
    other, _ = _take(_loader(seed=8), 4)
    assert [list(x['id']) for x in other] != [list(x['id']) for x in a]
    # global shuffle: the first epoch (9 batches) is a permutation of all 36, not in order
    epoch, _ = _take(_loader(), 9)
    ids = [i for x in epoch for i in x['id']]
    assert sorted(ids) == [f'synthetic/{i:08d}' for i in range(36)] and ids != sorted(ids)
    # the next epoch is shuffled differently
    nxt, _ = _take(_loader(), 18)
    assert [i for x in nxt[9:] for i in x['id']] != ids


def test_loader_crops_are_bicubic_resize_then_crop():
    batch = next(iter(_loader(batch_size=12, scale=False, shuffle=False)))
    assert batch['image'].dtype == np.uint8
    offsets = set()
    for img, uid in zip(batch['image'], batch['id']):
        src = SYN[int(uid.split('/')[1])]['image']
        h, w = src.shape[:2]
        nh, nw = (SIZE, int(SIZE * w / h)) if h <= w else (int(SIZE * h / w), SIZE)
        resized = np.asarray(Image.fromarray(src).resize((nw, nh), Image.BICUBIC))
        hits = [(t, l) for t in range(nh - SIZE + 1) for l in range(nw - SIZE + 1)
                if np.array_equal(resized[t:t + SIZE, l:l + SIZE], img)]
        assert hits, uid
        offsets.add((nh, nw, hits[0]))
    assert len(offsets) > 3  # crops move from record to record
    # x*2-1 scaling of exactly these pixels
    scaled = next(iter(_loader(batch_size=12, shuffle=False)))['image']
    np.testing.assert_allclose(scaled, batch['image'] / 127.5 - 1, atol=1e-6)
    # centre crop of a square image that needs no resize is the image itself
    np.testing.assert_array_equal(vdd.resize_and_crop(SYN[2]['image'], 16), SYN[2]['image'])


def test_loader_process_shards_partition_the_global_stream():
    single, _ = _take(_loader(batch_size=6), 6)          # one process, global batch 6
    shares = [_take(_loader(batch_size=3, process_index=p, process_count=2), 6)[0]
              for p in range(2)]
    # within the first epoch (6 batches of 3 per process = 36 records) disjoint and covering
    ids = [[i for x in share for i in x['id']] for share in shares]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(SYN[i]['id'] for i in range(36))
    # process p's element i is element 2*i+p of the global batch, crop included
    for j in range(6):
        for key in ('image', 'id', 'caption'):
            merged = np.empty_like(single[j][key])
            merged[0::2], merged[1::2] = shares[0][j][key], shares[1][j][key]
            np.testing.assert_array_equal(merged, single[j][key])


def test_loader_default_shard_is_the_jax_process(monkeypatch):
    import jax
    monkeypatch.setattr(jax, 'process_index', lambda: 1)
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    auto, _ = _take(vdd.make_loader(SYN, batch_size=3, image_size=SIZE, seed=7), 2)
    explicit, _ = _take(_loader(batch_size=3, process_index=1, process_count=2), 2)
    _assert_batches_equal(auto, explicit)


@pytest.mark.slow
def test_loader_resume_from_state_equals_uninterrupted():
    # 15 batches of 4 over 36 records crosses epoch boundaries; two processes' view
    kw = dict(process_index=1, process_count=2)
    full, _ = _take(_loader(**kw), 15)
    first, it = _take(_loader(**kw), 6)
    state = it.get_state()
    assert isinstance(state, bytes)
    # a fresh loader (as after a restart), state restored
    it2 = iter(_loader(**kw))
    it2.set_state(state)
    rest, _ = _take(None, 9, it2)
    _assert_batches_equal(first + rest, full)


@pytest.mark.slow
def test_loader_worker_processes_keep_records_crops_and_resume():
    # grain workers each batch their own slice of the stream (worker w: positions w, w+2, ...),
    # so batches regroup, but every pair of batches holds the same records with the same crops.
    plain, _ = _take(_loader(), 6)
    pooled, it = _take(_loader(worker_count=2), 4)
    state = it.get_state()
    pooled += _take(None, 2, it)[0]
    del it
    for j in range(0, 6, 2):
        a = {i: im for x in plain[j:j + 2] for i, im in zip(x['id'], x['image'])}
        b = {i: im for x in pooled[j:j + 2] for i, im in zip(x['id'], x['image'])}
        assert a.keys() == b.keys()
        for i in a:
            np.testing.assert_array_equal(a[i], b[i])
    # a restarted pool resumes onto the uninterrupted pool's batches
    resumed = iter(_loader(worker_count=2))
    resumed.set_state(state)
    _assert_batches_equal(_take(None, 2, resumed)[0], pooled[4:])
    del resumed


def test_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match='image_size'):
        vdd.make_loader(SYN, batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match='both process_index and process_count'):
        vdd.make_loader(SYN, batch_size=2, image_size=8, process_index=0)
    with pytest.raises(ValueError, match='shard_index'):
        vdd.make_loader(SYN, batch_size=2, image_size=8, process_index=2, process_count=2)
    with pytest.raises(TypeError, match='cannot read records'):
        vdd.make_loader(42, batch_size=2, image_size=8)


def test_synthetic_source_is_deterministic():
    a, b = vdd.SyntheticImageSource(5, (7, 9), seed=1), vdd.SyntheticImageSource(5, (7, 9), seed=1)
    for i in range(5):
        assert a[i]['caption'] == b[i]['caption'] and a[i]['id'] == f'synthetic/{i:08d}'
        np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
        assert a[i]['image'].shape == (7, 9, 3) and a[i]['image'].dtype == np.uint8
    assert not np.array_equal(a[0]['image'], vdd.SyntheticImageSource(5, (7, 9), seed=2)[0]['image'])
    with pytest.raises(IndexError):
        a[5]


# ----------------------------------------------------------------------------------------
# pre-encoding
# ----------------------------------------------------------------------------------------

class FakeEncoder:
    """latent: 4x4 mean-pooled image (B, S/4, S/4, 3) f32; context: caption-seeded (B, 5, 8) f16."""

    def __init__(self):
        self.batch_sizes = []

    @staticmethod
    def context(caption):
        seed = int.from_bytes(caption.encode()[:8].ljust(8, b'\0'), 'little')
        return np.random.default_rng(seed).normal(size=(5, 8)).astype(np.float16)

    def __call__(self, batch):
        img = batch['image']
        self.batch_sizes.append(img.shape[0])
        b, s = img.shape[0], img.shape[1]
        latent = img.reshape(b, s // 4, 4, s // 4, 4, 3).mean((2, 4))
        return {'latent': latent, 'context': np.stack([self.context(c) for c in batch['caption']])}


def test_preencode_round_trip(tmp_path):
    src = vdd.SyntheticImageSource(10, [(20, 28), (16, 16)], seed=5)
    enc = FakeEncoder()
    builder = vdd.preencode(src, enc, str(tmp_path), image_size=SIZE, batch_size=4)
    assert enc.batch_sizes == [4, 4, 4]   # last batch padded to keep one compiled shape
    out = builder.as_data_source()['train']
    assert len(out) == 10
    for j in range(len(out)):
        r = out[j]
        i = int(r['id'].decode().split('/')[1])
        crop = vdd.resize_and_crop(src[i]['image'], SIZE).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(r['latent'], crop.reshape(4, 4, 4, 4, 3).mean((1, 3)),
                                   atol=1e-6)
        assert r['latent'].dtype == np.float32 and r['context'].dtype == np.float16
        assert r['caption'].decode() == src[i]['caption']
        np.testing.assert_array_equal(r['context'], FakeEncoder.context(src[i]['caption']))
        assert 'image' not in r
    # the same loader trains on it; no resize for records without an image
    batch = next(iter(vdd.make_loader(builder, batch_size=5, seed=0, process_index=0,
                                      process_count=1)))
    assert batch['latent'].shape == (5, 4, 4, 3) and batch['context'].shape == (5, 5, 8)
    # reused, not re-encoded, unless overwrite
    again = vdd.preencode(src, enc, str(tmp_path), image_size=SIZE, batch_size=4)
    assert enc.batch_sizes == [4, 4, 4] and len(again.as_data_source('train')) == 10
    vdd.preencode(src, enc, str(tmp_path), image_size=SIZE, batch_size=5, overwrite=True)
    assert enc.batch_sizes == [4, 4, 4, 5, 5]


def test_preencode_rejects_bad_encoder_outputs(tmp_path):
    import ml_dtypes
    src = vdd.SyntheticImageSource(3, (8, 8))
    cases = [(lambda b: {'latent': np.zeros((1, 2))}, 'leading dim'),
             (lambda b: {'latent': np.zeros((2, 2), ml_dtypes.bfloat16)}, 'bfloat16'),
             (lambda b: {'caption': np.zeros((2, 2))}, 'clashes'),
             (lambda b: np.zeros((2, 2)), 'dict of arrays')]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            vdd.preencode(src, fn, str(tmp_path), image_size=8, batch_size=2)
