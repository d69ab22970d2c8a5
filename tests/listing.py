"""The vendored key listing of the released four-flow checkpoint (tests/data/README.md)."""
import json
import os
from typing import Dict, List, Tuple

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
LISTING = os.path.join(DATA, 'vd_keys_fourflow.tsv')


def rows(name: str = 'vd_keys_fourflow.tsv') -> List[List[str]]:
    """Tab-separated rows of a listing, without comment lines and the header."""
    out = []
    with open(os.path.join(DATA, name)) as f:
        for line in f:
            if line.startswith('#') or not line.strip():
                continue
            out.append(line.rstrip('\n').split('\t'))
    return out[1:]


def shape(text: str) -> Tuple[int, ...]:
    return tuple(int(s) for s in text.split(',')) if text else ()


def shapes(prefix: str = '') -> Dict[str, Tuple[int, ...]]:
    """{key: shape} of every key of the released checkpoint (optionally under `prefix`)."""
    return {r[0]: shape(r[1]) for r in rows() if r[0].startswith(prefix)}


def param_counts() -> Dict[str, int]:
    with open(os.path.join(DATA, 'vd_param_counts.json')) as f:
        return json.load(f)
