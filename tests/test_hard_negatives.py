"""Hard-negative batches of the shapes world (`data.hard_negatives`, vd_jax.data.hard_negatives)."""
import os

import grain
import numpy as np
import pytest

from vd_jax.config import load_config
from vd_jax.data import hard_negatives as hn
from vd_jax.data import shapes as sw
from vd_jax.errors import ConfigError
from vd_jax.sharding import create_mesh
from vd_jax.train.inputs import make_data_loader, make_source

NUM_TRAIN = 2000   # ~1.3 records per training combination: nearly every record has neighbours


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    builder = sw.build_shapes(str(tmp_path_factory.mktemp('shapes')), num_train=NUM_TRAIN,
                              num_heldout=30, seed=0)
    return builder.as_data_source()['train']


@pytest.fixture(scope='module')
def mesh():
    return create_mesh({'data': -1, 'fsdp': 1, 'model': 1})


def _cfg(k=4, batch=16, **data):
    cfg = load_config('train_vd_mini:clip')
    cfg.batch_size = batch
    cfg.data.hard_negatives = k
    cfg.data.update(data)
    return cfg


def _batches(loader, n, it=None):
    it = iter(loader) if it is None else it
    return [next(it) for _ in range(n)]


def _labels(batch):
    return np.stack([batch[f] for f in sw.FIELDS], axis=1).astype(np.int64)


def _combo(labels, **change):
    attrs = sw.Attributes(*(sw.VOCAB[f][i] for f, i in zip(sw.FIELDS, labels)))
    return attrs._replace(**{f: sw.VOCAB[f][v] for f, v in change.items()}).combination


def _check_groups(batch, k, attrs=sw.FIELDS):
    """Every group of k rows: base + members each differing from it in exactly one attribute
    (one of `attrs`), no two alike, none held out. Returns the attributes changed."""
    labels = _labels(batch)
    assert len(labels) % k == 0
    changed = []
    for g in range(0, len(labels), k):
        group = labels[g:g + k]
        assert len({tuple(r) for r in group}) == k, group
        for row in group:
            assert not sw.is_heldout(sw.Attributes(*(sw.VOCAB[f][i] for f, i in
                                                     zip(sw.FIELDS, row))))
        for row in group[1:]:
            diff = np.nonzero(row != group[0])[0]
            assert len(diff) == 1, (group[0], row)
            assert sw.FIELDS[diff[0]] in attrs
            changed.append(sw.FIELDS[diff[0]])
    return changed


def test_groups_are_a_base_and_one_attribute_neighbours(source, mesh):
    batches = _batches(make_data_loader(_cfg(k=4), source, mesh), 6)
    changed = []
    for b in batches:
        assert b['image'].shape == (16, 64, 64, 3)
        changed += _check_groups(b, 4)
        # the records are the ones the indices name (image, caption and labels together)
        for i in (0, 5):
            r = source[int(b['index'][i])]
            assert b['caption'][i] == r['caption'].decode()
            np.testing.assert_array_equal(_labels(b)[i], [r[f] for f in sw.FIELDS])
    assert set(changed) == set(sw.FIELDS)       # cycling over all five attributes
    # only the configured attributes change; where a base has fewer than k-1 position
    # neighbours in these 2000 records, the rest of its group are random records
    table = hn.NeighbourTable(hn.record_labels(source))
    loader = make_data_loader(_cfg(k=4, hard_negative_attrs='position'), source, mesh)
    short = 0
    for b in _batches(loader, 6):
        labels = _labels(b)
        for g in range(0, 16, 4):
            base, members = labels[g], labels[g + 1:g + 4]
            available = sum(len(table.records(_combo(base, position=v))) > 0
                            for v in range(9) if v != base[4])
            near = [m for m in members if (m != base).sum() == 1]
            assert all(m[4] != base[4] for m in near)
            assert len(near) == min(3, available)
            short += available < 3
    assert short < 6


def test_same_seed_same_batches_and_exact_resume(source, mesh):
    first = [b['index'] for b in _batches(make_data_loader(_cfg(), source, mesh), 5)]
    again = [b['index'] for b in _batches(make_data_loader(_cfg(), source, mesh), 5)]
    np.testing.assert_array_equal(first, again)
    other = [b['index'] for b in _batches(make_data_loader(_cfg(seed=1), source, mesh), 5)]
    assert not np.array_equal(first, other)
    # resume mid-epoch from the iterator state onto the uninterrupted run's batches
    it = iter(make_data_loader(_cfg(), source, mesh))
    _batches(None, 2, it)
    state = it.get_state()
    rest = [b['index'] for b in _batches(None, 3, it)]
    np.testing.assert_array_equal(rest, first[2:5])
    resumed = iter(make_data_loader(_cfg(), source, mesh))
    resumed.set_state(state)
    np.testing.assert_array_equal([b['index'] for b in _batches(None, 3, resumed)], rest)


def test_two_processes_get_disjoint_bases_and_whole_groups(source, mesh):
    k, batch, steps = 4, 16, 3
    shares = [_batches(make_data_loader(_cfg(k=k, batch=batch), source, mesh, p, 2), steps)
              for p in (0, 1)]
    for share in shares:
        for b in share:
            _check_groups(b, k)
    bases = [np.concatenate([b['index'][::k] for b in share]) for share in shares]
    assert not set(bases[0]) & set(bases[1])
    # group g of process p has the base the plain shuffled stream has at position 2g + p
    plain = grain.samplers.IndexSampler(num_records=NUM_TRAIN, shuffle=True, seed=0)
    groups = steps * batch // k
    for p in (0, 1):
        np.testing.assert_array_equal(
            bases[p], [plain[2 * g + p].record_key for g in range(groups)])
    ids = [set(np.concatenate([b['id'] for b in share])) for share in shares]
    assert ids[0] != ids[1]


def test_off_is_exactly_the_plain_loader(source, mesh):
    plain_cfg = _cfg(k=0)
    del plain_cfg.data['hard_negatives']
    del plain_cfg.data['hard_negative_attrs']
    for p, n in ((0, 1), (1, 2)):
        plain = _batches(make_data_loader(plain_cfg, source, mesh, p, n), 3)
        off = _batches(make_data_loader(_cfg(k=0), source, mesh, p, n), 3)
        on = _batches(make_data_loader(_cfg(k=4), source, mesh, p, n), 3)
        for a, b, c in zip(plain, off, on):
            assert sorted(a) == sorted(b)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
            assert not np.array_equal(a['index'], c['index'])


def test_config_errors_come_before_any_work(source, mesh, tmp_path):
    with pytest.raises(ConfigError, match=r'data\.hard_negatives=4.*batch size 18'):
        make_data_loader(_cfg(k=4, batch=18), source, mesh)
    with pytest.raises(ConfigError, match=r"data\.hard_negatives=4 needs data\.kind='shapes'"):
        make_data_loader(_cfg(kind='synthetic'), source, mesh)
    with pytest.raises(ConfigError, match=r'data\.hard_negatives=1'):
        make_data_loader(_cfg(k=1), source, mesh)
    with pytest.raises(ConfigError, match=r"data\.hard_negative_attrs='posit'"):
        make_data_loader(_cfg(hard_negative_attrs='posit'), source, mesh)
    # make_source checks before building the world (nothing written into the workdir)
    for cfg, what in ((_cfg(k=4, batch=18), 'batch size 18'),
                      (_cfg(kind='synthetic'), "data.kind='synthetic'"),
                      (_cfg(kind='images', path=str(tmp_path)), "data.kind='images'")):
        with pytest.raises(ConfigError, match=f"data.hard_negatives=4.*{what}"):
            make_source(cfg, str(tmp_path / 'work'), [])
    assert not os.path.exists(tmp_path / 'work')
    # and a good config passes the same check
    assert hn.check_config(_cfg(k=4, batch=16).data, 16) == 4
    assert hn.check_config(_cfg(k=0, batch=18).data, 18) == 0


def test_members_never_come_from_heldout_combinations():
    # a source holding every combination once, held-out ones too (a train source has none)
    labels = np.array([a.labels() for a in sw.ALL_COMBINATIONS])
    records = [dict(zip(sw.FIELDS, row)) for row in labels]
    table = hn.NeighbourTable(hn.record_labels(records))
    heldout = [a.combination for a in sw.HELDOUT_COMBINATIONS]
    assert all(len(table.records(c)) == 0 for c in heldout)
    assert all(len(table.records(a.combination)) == 1 for a in sw.TRAIN_COMBINATIONS)
    base = grain.samplers.IndexSampler(num_records=len(records), shuffle=True, seed=3)
    sampler = hn.HardNegativeSampler(base, table, 6, sw.FIELDS, 1, 3)
    for n in range(0, 6 * 300, 6):
        keys = [sampler[n + m].record_key for m in range(6)]
        assert keys[0] == base[n // 6].record_key
        for key in keys[1:]:
            assert not sw.is_heldout(sw.ALL_COMBINATIONS[key])
            assert (labels[key] != labels[keys[0]]).sum() == 1
