"""Splitting samples over processes (`vd_jax.batching`) and sample.py's use of it.

`run_task` is driven here with a stand-in pipeline whose output row j of a call is
(seed + j, the prompt's number): what a process computes, with which seed and in which
batch shape, is then visible exactly, without running a model. The real two-process run
is in tests/test_mesh_sampling.py.
"""
import io

import numpy as np
import pytest

from vd_jax import sample_cli
from vd_jax.cli.sample_run import run_task
from vd_jax.cli.sample_tasks import TaskInputs
from vd_jax.batching import (batch_size_for, consecutive_batches, map_batched, pad_batch, pad_rows,
                             padded_batches, process_share, round_up, trim_rows)
from vd_jax.outputs import LineProgress


@pytest.mark.parametrize('total', [0, 1, 3, 4, 7, 64])
@pytest.mark.parametrize('count', [1, 2, 3, 5])
def test_process_shares_cover_every_sample_once_and_differ_by_at_most_one(total, count):
    shares = [process_share(total, k, count) for k in range(count)]
    assert [i for s in shares for i in s] == list(range(total))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_batches_are_consecutive_runs_padded_with_the_last_input():
    assert consecutive_batches([0, 1, 2, 5, 6, 9], 2) == [[0, 1], [2], [5, 6], [9]]
    assert pad_batch(['a', 'b'], 4) == ['a', 'b', 'b', 'b']
    assert batch_size_for(4, 8, 1) == 4 and batch_size_for(4, 8, 2) == 2
    assert batch_size_for(20, 8, 2) == 8 and batch_size_for(3, 8, 2) == 2


class FakePipeline:
    """text_to_image / text_variation: row j of a call is (seed + j, number of the prompt);
    records the batch size of every call."""
    schedule = None   # VD's: 'auto' spacing keeps the original grid

    def __init__(self, prompts):
        self.number = {p: k for k, p in enumerate(prompts)}
        self.calls = []

    def text_to_image(self, xs, n, seed, progress, **kw):
        assert n == 1
        self.calls.append((len(xs), seed))
        progress(kw['steps'], kw['steps'])
        return np.array([[[[seed + j, self.number[x]]]] for j, x in enumerate(xs)], np.float32)

    def text_variation(self, xs, n, seed, progress, **kw):
        rows = self.text_to_image(xs, n, seed, progress, **kw)
        return [f'seed {int(r[0, 0, 0])} prompt {int(r[0, 0, 1])}' for r in rows]


def _run(argv, share, tmp_path):
    parser = sample_cli.build_parser()
    args = parser.parse_args(argv + ['--out', str(tmp_path), '--steps', '2', '--seed', '10'])
    t, prompts, paths = sample_cli.validate(args, parser)
    vd = FakePipeline(prompts)
    bar = LineProgress(file=io.StringIO())
    r = run_task(vd, t, args, TaskInputs(prompts, [], paths), bar, share=share)
    return dict(labels=r.labels, images=r.images, texts=r.texts, index=r.index, calls=vd.calls,
                log=bar.file.getvalue())


FOUR = ['--prompt', 'p0', '--prompt', 'p1', '--prompt', 'p2', '--prompt', 'p3']


@pytest.mark.parametrize('task', ['t2i', 't2t'])
def test_two_processes_each_sample_half_of_four_prompts_like_one_process(task, tmp_path):
    # the case: 4 prompts, n = 1, the default --batch-size 8 (one batch in one process)
    argv = FOUR + ['--task', task, '--n', '1']
    one = _run(argv, (0, 1), tmp_path)
    assert one['calls'] == [(4, 10)]  # one process: unchanged, one batch of 4
    parts = [_run(argv, (k, 2), tmp_path) for k in range(2)]
    assert [p['index'] for p in parts] == [[0, 1], [2, 3]]
    assert [p['calls'] for p in parts] == [[(2, 10)], [(2, 12)]]  # seeds continue
    assert 't2i batch 1/2' in parts[0]['log'].replace(task, 't2i')
    assert 't2i batch 2/2' in parts[1]['log'].replace(task, 't2i')
    assert parts[0]['labels'] + parts[1]['labels'] == one['labels'] == ['p0', 'p1', 'p2', 'p3']
    if task == 't2i':
        np.testing.assert_array_equal(np.concatenate([p['images'] for p in parts]),
                                      one['images'])
        assert one['images'][:, 0, 0, 0].tolist() == [10, 11, 12, 13]
    else:
        assert parts[0]['texts'] + parts[1]['texts'] == one['texts']


def test_uneven_shares_differ_by_one_sample_and_every_call_has_one_shape(tmp_path):
    # 3 prompts x 3 = 9 samples, --batch-size 2, 3 processes: 3 each, in batches of 2
    argv = ['--prompt', 'a', '--prompt', 'b', '--prompt', 'c', '--n', '3', '--batch-size', '2']
    one = _run(argv, (0, 1), tmp_path)
    parts = [_run(argv, (k, 3), tmp_path) for k in range(3)]
    assert [len(p['index']) for p in parts] == [3, 3, 3]
    assert {size for p in parts for size, _ in p['calls']} == {2}
    np.testing.assert_array_equal(np.concatenate([p['images'] for p in parts]), one['images'])
    assert [lab for p in parts for lab in p['labels']] == one['labels']
    # 5 samples over 2 processes: 2 and 3
    argv = ['--prompt', 'a', '--n', '5']
    parts = [_run(argv, (k, 2), tmp_path) for k in range(2)]
    assert [p['index'] for p in parts] == [[0, 1], [2, 3, 4]]
    assert [p['calls'] for p in parts] == [[(3, 10)], [(3, 12)]]  # padded to one shape


# ------------------------------------------------------------------------------------------
# The one "pad the last batch, continue the seeds, trim" helper
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('batch_size', [1, 2, 3, 7, 8])
def test_map_batched_gives_item_i_seed_plus_i_in_one_shape_whatever_the_batch_size(batch_size):
    calls = []

    def fn(xs, seed):  # row j: (the item, seed + j)
        calls.append(len(xs))
        return [(x, seed + j) for j, x in enumerate(xs)]
    items = ['a', 'b', 'c', 'd', 'e', 'f', 'g']
    out = map_batched(fn, items, batch_size, 100)
    assert out == [(x, 100 + i) for i, x in enumerate(items)]  # repeats' outputs dropped
    assert set(calls) == {min(batch_size, len(items))}  # every call: one shape


def test_padded_batches_continue_the_seeds_over_gaps_and_trim_the_padding():
    batches = padded_batches(lambda i: f'x{i}', [0, 1, 2, 5], 2, seed=10)
    assert [(b.indices, b.inputs, b.seed) for b in batches] == [
        ([0, 1], ['x0', 'x1'], 10), ([2], ['x2', 'x2'], 12), ([5], ['x5', 'x5'], 15)]
    assert batches[1].trim(np.array([7, 8])) == [7]


def test_pad_rows_repeats_the_last_row_of_every_leaf_and_trim_rows_undoes_it():
    import jax.numpy as jnp
    tree = {'a': np.arange(6).reshape(3, 2), 'b': jnp.arange(3.0)}
    padded = pad_rows(tree, 3, 5)
    assert isinstance(padded['a'], np.ndarray)  # numpy stays numpy (host-side inputs)
    np.testing.assert_array_equal(padded['a'], [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    np.testing.assert_array_equal(padded['b'], [0, 1, 2, 2, 2])
    back = trim_rows(padded, 3)
    np.testing.assert_array_equal(back['a'], tree['a'])
    assert trim_rows(['s0', 's1', 's1'], 2) == ['s0', 's1']
    assert pad_rows(tree, 3, 3) is tree and round_up(5, 4) == 8 and round_up(8, 4) == 8


def test_run_task_runs_any_task_of_the_table_without_knowing_its_name(tmp_path):
    """A task called once with n (as dual / multi / disentangle / i2t2i) that is not in
    TASKS: run_task follows its `call` and `outputs`, and labels the outputs by the input."""
    import dataclasses
    parser = sample_cli.build_parser()
    args = parser.parse_args(['--prompt', 'p', '--n', '3', '--steps', '2', '--seed', '5',
                              '--out', str(tmp_path)])
    sample_cli.validate(args, parser)
    seen = {}

    def call(method, inputs, n, kw):
        seen.update(prompt=inputs.prompts[0], n=n, seed=kw['seed'])
        return method(n)

    def outputs(out):
        return out[1], out[0]  # (texts, images) -> images, texts
    task = dataclasses.replace(sample_cli.TASKS['t2i'], method='made_up', call=call,
                               outputs=outputs, runs=2)

    class Made:
        schedule = None   # VD's

        def made_up(self, n):
            return [f's{i}' for i in range(n)], np.zeros((n, 1, 1, 3), np.float32)
    bar = LineProgress(file=io.StringIO())
    r = run_task(Made(), task, args, TaskInputs(['p'], [], ['in.png']), bar)
    assert seen == {'prompt': 'p', 'n': 3, 'seed': 5}
    assert r.texts == ['s0', 's1', 's2'] and r.images.shape == (3, 1, 1, 3)
    assert r.index == [0, 1, 2] and r.labels == ['in.png'] * 3
