"""benchmarks/common.py's host record: which CPU kind a benchmark ran on, read from
/proc/cpuinfo (vendor, family, model), so records are compared only within one kind, and
benchmarks/report.py groups them by it. Fast: no JAX, no benchmark is run."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import common  # noqa: E402
import report  # noqa: E402

# the first processor of /proc/cpuinfo on two hosts this project ran on (a KVM guest: the model
# name says only 'AMD EPYC'), and an Intel one
ZEN4 = '''processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 99
'''


def _cpu(tmp_path, text):
    path = tmp_path / 'cpuinfo'
    path.write_text(text)
    return common.cpu_id(str(path))


def test_cpu_id_reads_the_first_processor(tmp_path):
    assert _cpu(tmp_path, ZEN4) == dict(vendor='AuthenticAMD', family=25, model=17,
                                        model_name='AMD EPYC', stepping=1)
    assert common.cpu_id(str(tmp_path / 'missing')) == {}


def test_host_kinds():
    amd = dict(vendor='AuthenticAMD')
    assert common.host_kind(dict(amd, family=25, model=17)) == 'Zen 4'     # Genoa
    assert common.host_kind(dict(amd, family=25, model=1)) == 'Zen 3'      # Milan
    assert common.host_kind(dict(amd, family=25, model=0x61)) == 'Zen 4'   # Raphael
    assert common.host_kind(dict(amd, family=25, model=0x21)) == 'Zen 3'   # Vermeer
    assert common.host_kind(dict(amd, family=26, model=2)) == 'Zen 5'      # Turin
    assert common.host_kind(dict(vendor='GenuineIntel', family=6, model=143)) == \
        'GenuineIntel family 6 model 143'
    assert common.host_kind({}) == 'unknown'


def test_report_groups_records_by_host_kind(tmp_path, capsys):
    paths = []
    for i, kind in enumerate(('Zen 5', 'Zen 4', 'Zen 5')):
        rec = dict(machine=dict(cpu='AMD EPYC', host_kind=kind, cores=2, date=f'd{i}',
                                loadavg_at_start=[0.1], git='abc'))  # no 'benchmark': no table
        path = tmp_path / f'bench_fullsize-{i}.json'
        path.write_text(json.dumps(rec))
        paths.append(str(path))
    report.main(paths)
    out = capsys.readouterr().out
    assert out.index('## host: Zen 4') < out.index('bench_fullsize-1.json') < \
        out.index('## host: Zen 5') < out.index('bench_fullsize-0.json') < \
        out.index('bench_fullsize-2.json')
    assert out.count('## host:') == 2


def test_report_names_a_bad_record_before_printing(tmp_path, capsys):
    good = tmp_path / 'bench_fullsize-0.json'
    good.write_text(json.dumps(dict(machine=dict(cpu='AMD EPYC', host_kind='Zen 4', cores=2,
                                                 date='d', loadavg_at_start=[0.1], git='abc'))))
    (tmp_path / 'notes.json').write_text('[1, 2]')
    for bad, want in ((tmp_path / 'missing.json', 'cannot read benchmark record'),
                      (tmp_path / 'notes.json', 'is not a benchmark record')):
        with pytest.raises(SystemExit) as e:
            report.main([str(good), str(bad)])
        assert e.value.code == 2
        out, err = capsys.readouterr()
        assert want in err and str(bad) in err and out == ''   # nothing printed first
