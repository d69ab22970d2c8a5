"""The web demo (`python -m vd_jax.demo`) driven by a real headless browser.

The app runs in a subprocess on a free localhost port with the random tiny model
(`--config tiny --seed-model 0`); Debian's Chromium, driven by Playwright, fills prompts,
uploads a file and clicks "Run". The images the page shows (the PNG files it serves) must
equal, within 1/255, what `VersatileDiffusion.random('tiny', 0)` in this process returns for
the same seed and settings, and the texts must be equal exactly. One more server runs as a
newcomer starts it (no arguments: the shipped VD-mini), checked the same way against
`VersatileDiffusion.default()`. Screenshots go to a temporary folder (printed); with
VD_DEMO_DOCS=1 also to docs/demo/ (the README's).

Needs /usr/bin/chromium (`apt-get install -y chromium`; .ci/run installs it) or
VD_CHROMIUM=path; without it the test fails with that message. Playwright's own browser
download (`playwright install`) is never used.
"""
import concurrent.futures
import contextlib
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest

from vd_jax.errors import InputError

pytestmark = pytest.mark.slow  # minutes of real runs; CI runs them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get('VD_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
MAX_PIXELS = 200_000      # the server's --max-pixels, so that a small file can exceed it
STEPS, N, SEED = 2, 2, 7  # few steps, a seed that is not the page's default (20)
COMMON = dict(steps=STEPS, scale=7.5, sampler='ddim', eta=0.0, seed=SEED)
PROMPT = 'a small house by a lake'
TIMEOUT_MS = 120_000
VIEWPORT = {'width': 1200, 'height': 1500}


# ---------------------------------------------------------------------------------------
# Fixtures: the reference model, the server, the browser
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def upload_png(tmp_path_factory):
    """An input image of an odd size (resized by the pipeline), as a PNG file."""
    from PIL import Image
    rng = np.random.RandomState(3)
    a = (rng.rand(40, 56, 3) * 255).astype(np.uint8)
    a[8:30, 10:40] = (200, 40, 60)
    path = str(tmp_path_factory.mktemp('upload') / 'input.png')
    Image.fromarray(a).save(path)
    return path


@pytest.fixture(scope='module')
def mask_png(tmp_path_factory):
    """A grey keep-mask file (white = use), a soft diagonal, for the multi-context tab."""
    from PIL import Image
    y, x = np.mgrid[0:48, 0:48]
    m = np.clip((x + y - 30) * 8, 0, 255).astype(np.uint8)
    path = str(tmp_path_factory.mktemp('mask') / 'mask.png')
    Image.fromarray(m, mode='L').save(path)
    return path


@pytest.fixture(scope='module')
def reference(upload_png, mask_png):
    """The library's own results for the settings the browser sets, computed in a background
    thread (while the server starts and the browser works) with the same random model."""
    from vd_jax.demo.inputs import example_image
    from vd_jax.image_io import load_image
    from vd_jax.pipeline import VersatileDiffusion

    vd = None

    def model():
        nonlocal vd
        vd = vd or VersatileDiffusion.random('tiny', 0)
        return vd, dict(height=vd.image_size, width=vd.image_size)

    def t2i():
        vd, hw = model()
        return vd.text_to_image([PROMPT], N, negative_prompt='', **hw, **COMMON)

    def i2i():
        vd, hw = model()
        return vd.image_variation(load_image(upload_png), N, fidelity=0.0, focus=0.5,
                                  color_adjust=True, **hw, **COMMON)

    def i2t():
        vd, _ = model()
        return vd.image_to_text(load_image(upload_png), N, decode='sample', temperature=1.0,
                                **COMMON)

    def dual():
        vd, hw = model()
        return vd.dual_guided(PROMPT, example_image('checkerboard'), N, mix=0.5, level='attention',
                              focus=0.5, output='image', **hw, **COMMON)

    def multi():
        from vd_jax.demo.inputs import preset_mask
        from PIL import Image
        vd, hw = model()
        mask = np.asarray(Image.open(mask_png).convert('L'), np.float32) / 255.0
        return vd.multi_context([example_image('sunset'), example_image('checkerboard')], [1.0, 0.6],
                                None, N, text_strength=0.0, masks=[preset_mask('left half'), mask],
                                focus=[0.5, 0.5], **hw, **COMMON)

    pool = concurrent.futures.ThreadPoolExecutor(1)  # in the order the tests need them
    futures = {f.__name__: pool.submit(f) for f in (t2i, i2i, i2t, dual, multi)}
    yield {k: f.result for k, f in futures.items()}
    pool.shutdown(wait=False, cancel_futures=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(tmp_path_factory, model_args):
    """`python -m vd_jax.demo <model_args>` on a free localhost port; yields its URL once it
    answers (its log is printed at the end)."""
    port = _free_port()
    log_path = str(tmp_path_factory.mktemp('server') / 'server.log')
    log = open(log_path, 'w')
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, '-m', 'vd_jax.demo', *model_args,
         '--host', '127.0.0.1', '--port', str(port), '--max-pixels', str(MAX_PIXELS)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f'the demo exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}')
        try:
            with urllib.request.urlopen(url + '/_stcore/health', timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f'the demo did not answer on {url} in 120 s:\n{open(log_path).read()[-3000:]}')
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print(f'\ndemo server log: {log_path}')


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """The demo with the random tiny model (what the reference computes)."""
    with _serve(tmp_path_factory, ['--config', 'tiny', '--seed-model', '0']) as url:
        yield url


@pytest.fixture(scope='module')
def default_server(tmp_path_factory):
    """The demo as a newcomer starts it: no model arguments, the shipped VD-mini."""
    with _serve(tmp_path_factory, []) as url:
        yield url


@pytest.fixture(scope='module')
def shots(tmp_path_factory):
    """Where screenshots go: a temporary folder always, docs/demo/ with VD_DEMO_DOCS=1."""
    d = str(tmp_path_factory.mktemp('demo_screenshots'))
    print(f'\nscreenshots: {d}')
    docs = os.path.join(ROOT, 'docs', 'demo') if os.environ.get('VD_DEMO_DOCS') == '1' else None

    def save(page, name):
        path = os.path.join(d, f'{name}.png')
        main = page.locator('[data-testid="stMainBlockContainer"]')
        height = main.evaluate('e => e.scrollHeight')  # the whole tab, not just the viewport
        page.set_viewport_size({'width': VIEWPORT['width'], 'height': max(VIEWPORT['height'], height + 200)})
        page.wait_for_timeout(300)
        main.screenshot(path=path)
        page.set_viewport_size(VIEWPORT)
        if docs:
            os.makedirs(docs, exist_ok=True)
            shutil.copy(path, os.path.join(docs, f'{name}.png'))
        return path
    return save


@pytest.fixture(scope='module')
def chromium():
    """The browser binary, checked before anything starts: missing is a failure, not a skip."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f'Chromium not found at {CHROMIUM}: the browser test needs it. Install it with '
                    '`apt-get install -y chromium` (Debian; .ci/run does) or set VD_CHROMIUM to a '
                    'Chromium binary. Playwright\'s own browser download is not used.')
    if importlib.util.find_spec('playwright') is None or importlib.util.find_spec('streamlit') is None:
        pytest.fail("the browser test needs Playwright and Streamlit: pip install -e '.[test]'")
    return CHROMIUM


@pytest.fixture(scope='module')
def browser(chromium, server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        profile = tempfile.mkdtemp(prefix='vd_demo_chromium_')
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
            viewport=VIEWPORT, accept_downloads=True)
        ctx.set_default_timeout(TIMEOUT_MS)
        outside = []
        ctx.on('request', lambda r: outside.append(r.url)  # this test's servers only
               if not r.url.startswith(('http://127.0.0.1:', 'data:', 'blob:')) else None)
        yield ctx, outside
        ctx.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope='module')
def page(browser, server):
    ctx, _ = browser
    pg = ctx.new_page()
    pg.goto(server)
    pg.get_by_role('tab', name='Text-to-Image').wait_for()
    return pg


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def _open_tab(page, title):
    page.get_by_role('tab', name=title, exact=True).click()


def _set(page, key, value):
    box = page.locator(f'.st-key-{key} input, .st-key-{key} textarea').first
    box.fill(str(value))
    box.press('Tab')  # commit the value to the form


def _settings(page, tab, n=N):
    _set(page, f'{tab}_seed', SEED)
    _set(page, f'{tab}_n', n)
    _set(page, f'{tab}_steps', STEPS)


def _run(page, tab):
    """Click Run and wait until this request's outputs replaced any earlier ones."""
    old = page.locator(f'.st-key-{tab}_outputs').count()
    page.locator(f'.st-key-{tab}_run button').click()
    if old:
        page.locator(f'.st-key-{tab}_outputs').wait_for(state='detached')
    page.locator(f'.st-key-{tab}_outputs').wait_for()


def _shown_images(page, server, tab, part='outputs') -> np.ndarray:
    """The PNGs the page shows as the tab's outputs (or inputs), fetched by their src, uint8."""
    from PIL import Image
    imgs = page.locator(f'.st-key-{tab}_{part} [data-testid="stImage"] img')
    imgs.first.wait_for()
    out = []
    for i in range(imgs.count()):
        src = imgs.nth(i).get_attribute('src')
        body = _fetch(src if src.startswith('http') else server + src)
        out.append(np.asarray(Image.open(io.BytesIO(body)).convert('RGB')))
    return np.stack(out)


def _fetch(url: str, attempts: int = 3) -> bytes:
    """GET a file the page shows, on a fresh connection each time. Playwright's request
    context reuses a kept-alive connection that the busy server may already have closed (a CI
    run failed with ECONNRESET that way); a reset connection is retried, a wrong status is not."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return r.read()
        except (ConnectionError, urllib.error.URLError) as e:
            if isinstance(e, urllib.error.HTTPError) or attempt == attempts - 1:
                raise AssertionError(f'the page shows {url}, which the server does not serve: {e}')
            time.sleep(1.0)


def _shown_texts(page, tab):
    texts = page.locator(f'.st-key-{tab}_outputs [data-testid="stText"]')
    texts.first.wait_for()
    return [texts.nth(i).text_content() for i in range(texts.count())]


def _assert_images_match(shown, expected, what):
    from vd_jax.outputs import to_uint8
    ref = to_uint8(expected)
    assert shown.shape == ref.shape, f'{what}: the page shows {shown.shape}, the library gives {ref.shape}'
    diff = np.abs(shown.astype(int) - ref.astype(int)).max()
    assert diff <= 1, f'{what}: the page differs from the library by {diff}/255'


def _alert(page, text):
    return page.locator('[data-testid="stAlert"]', has_text=text)


# ---------------------------------------------------------------------------------------
# The browser tests (in file order, one page)
# ---------------------------------------------------------------------------------------
def test_text_to_image(page, server, reference, shots):
    _open_tab(page, 'Text-to-Image')
    _set(page, 't2i_prompt', PROMPT)
    _settings(page, 't2i')
    page.locator('.st-key-t2i_run button').click()
    # the request shows its state while it runs (the first call compiles the sampler)
    _alert(page, 'Running (the first request').wait_for()
    # the progress bar: after the sampler's last step it stays while the first VAE decode compiles
    page.locator('[data-testid="stProgress"]', has_text=f'step {STEPS}/{STEPS}').wait_for()
    page.locator('.st-key-t2i_outputs').wait_for()
    shown = _shown_images(page, server, 't2i')
    _assert_images_match(shown, reference['t2i'](), 'text->image')
    shots(page, 'text_to_image')


def test_download_zip_has_outputs_and_settings(page, server):
    with page.expect_download() as dl:
        page.locator('.st-key-t2i_download button').click()
    with zipfile.ZipFile(dl.value.path()) as z:
        names = set(z.namelist())
        assert {'0000.png', '0001.png', 'grid.png', 'settings.json'} <= names, names
        settings = json.loads(z.read('settings.json'))
        png0 = z.read('0000.png')
    assert settings['task'] == 'text_to_image' and settings['prompt'] == PROMPT
    assert (settings['seed'], settings['steps'], settings['n']) == (SEED, STEPS, N)
    assert settings['checkpoint'] == 'random:tiny:0' and settings['untrained'] is True
    from PIL import Image
    with Image.open(io.BytesIO(png0)) as im:
        assert json.loads(im.text['vd_jax'])['seed'] == SEED  # settings in PNG metadata too
        assert np.array_equal(np.asarray(im.convert('RGB')), _shown_images(page, server, 't2i')[0])


def test_image_variation_upload(page, server, reference, upload_png, shots):
    _open_tab(page, 'Image-Variation')
    page.locator('.st-key-i2i_image_upload input[type="file"]').set_input_files(upload_png)
    page.locator('.st-key-i2i_image_upload').get_by_text('input.png').wait_for()
    _settings(page, 'i2i')
    _run(page, 'i2i')
    _assert_images_match(_shown_images(page, server, 'i2i'), reference['i2i'](),
                         'image variation')
    shots(page, 'image_variation')


def test_image_to_text(page, server, reference, upload_png, shots):
    _open_tab(page, 'Image-to-Text')
    page.locator('.st-key-i2t_image_upload input[type="file"]').set_input_files(upload_png)
    page.locator('.st-key-i2t_image_upload').get_by_text('input.png').wait_for()
    _settings(page, 'i2t')
    _run(page, 'i2t')
    assert _shown_texts(page, 'i2t') == reference['i2t']()
    # the random tiny Optimus writes nearly the same words for any latent (the seed decides),
    # so also check that the page used the uploaded image, bit for bit
    from vd_jax.image_io import load_image
    assert np.array_equal(_shown_images(page, server, 'i2t', 'inputs')[0], load_image(upload_png))
    shots(page, 'image_to_text')


def test_dual_guided(page, server, reference, shots):
    _open_tab(page, 'Dual-Context')
    _set(page, 'dual_prompt', PROMPT)
    _settings(page, 'dual')  # the tab's default example image is 'checkerboard'
    _run(page, 'dual')
    _assert_images_match(_shown_images(page, server, 'dual'), reference['dual'](),
                         'dual-guided')
    shots(page, 'dual_guided')


def test_requests_are_queued(browser, server):
    """A second session's request waits while another runs (one request at a time): page A
    starts text variation (its first call compiles, so it runs for seconds), page B then
    asks for text->image and is told it is queued; both finish."""
    ctx, _ = browser
    a, b = ctx.new_page(), ctx.new_page()
    for pg in (a, b):
        pg.goto(server)
        pg.get_by_role('tab', name='Text-to-Image').wait_for()
    _open_tab(a, 'Text-Variation')
    _settings(a, 't2t')
    _open_tab(b, 'Text-to-Image')
    _settings(b, 't2i')
    a.locator('.st-key-t2t_run button').click()
    _alert(a, 'Running (the first request').wait_for()
    b.locator('.st-key-t2i_run button').click()
    _alert(b, 'Queued: another request is running').wait_for()
    a.locator('.st-key-t2t_outputs').wait_for()
    b.locator('.st-key-t2i_outputs').wait_for()
    a.close()
    b.close()


def test_multi_context_with_masks(page, server, reference, mask_png, shots):
    """Two example images, a preset mask on the first, an uploaded mask and a lower weight
    on the second."""
    _open_tab(page, 'Multi-Context Blender')
    page.locator('.st-key-multi_mask0 input').click()
    page.get_by_role('option', name='left half', exact=True).click()
    page.get_by_role('tab', name='Image 2', exact=True).click()
    page.locator('.st-key-multi_mask1_upload input[type="file"]').set_input_files(mask_png)
    page.locator('.st-key-multi_mask1_upload').get_by_text('mask.png').wait_for()
    thumb = page.locator('.st-key-multi_weight1 input[type="range"]')
    thumb.focus()
    for _ in range(20):  # 1.0 -> 0.6 in the slider's 0.02 steps
        thumb.press('ArrowLeft')
    assert thumb.get_attribute('aria-valuetext') == '0.60'
    _settings(page, 'multi')
    _run(page, 'multi')
    _assert_images_match(_shown_images(page, server, 'multi'), reference['multi'](),
                         'multi-context with masks')
    page.get_by_role('tab', name='Image 1', exact=True).click()
    shots(page, 'multi_context')


@pytest.mark.parametrize('title,tab,kind,name', [
    ('Text-Variation', 't2t', 'text', 'text_variation'),
    ('Disentanglement', 'dis', 'image', 'disentangle'), ('I2T2I Editor', 'i2t2i', 'both', 'i2t2i')])
def test_other_tabs_run(page, server, shots, title, tab, kind, name):
    """Every other tab runs its task from the browser with its example inputs."""
    _open_tab(page, title)
    _settings(page, tab)
    _run(page, tab)
    if kind in ('image', 'both'):
        assert _shown_images(page, server, tab).shape[0] == N
    if kind in ('text', 'both'):
        assert len(_shown_texts(page, tab)) == N
    shots(page, name)


def test_bad_uploads_give_messages(page, server, tmp_path):
    """A file that is not an image and an image over the pixel limit are refused in the
    page; the server keeps serving."""
    from PIL import Image
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    big = tmp_path / 'big.png'
    Image.new('RGB', (600, 400), (10, 20, 30)).save(big)  # 240,000 px > --max-pixels 200,000
    _open_tab(page, 'Image-to-Text')
    up = page.locator('.st-key-i2t_image_upload input[type="file"]')
    for path, message in ((bad, 'broken.png'), (big, 'the limit is 200,000')):
        up.set_input_files(str(path))
        page.locator('.st-key-i2t_image_upload').get_by_text(path.name).wait_for()
        page.locator('.st-key-i2t_run button').click()
        _alert(page, message).wait_for()
    assert page.locator('.st-key-i2t_outputs').count() == 1  # the earlier result stays


def test_default_model_serves_vd_mini_with_its_examples(browser, default_server, shots):
    """`python -m vd_jax.demo` without arguments serves VD-mini: the page says what it knows,
    offers held-out shapes prompts, and its outputs for the first example are the library's
    (VersatileDiffusion.default(), same seed and settings, within 1/255)."""
    from vd_jax.demo.inputs import SHAPES_PROMPTS
    from vd_jax.pipeline import VersatileDiffusion
    ctx, _ = browser
    pg = ctx.new_page()
    try:
        pg.goto(default_server)
        pg.get_by_role('tab', name='Text-to-Image').wait_for()
        _alert(pg, 'single coloured shapes').wait_for()
        from playwright.sync_api import expect
        expect(pg.locator('.st-key-t2i_prompt textarea')).to_have_value(SHAPES_PROMPTS[0])
        # the guidance field starts at the model's recommended scale (VD-mini v3: 3)
        expect(pg.locator('.st-key-t2i_scale input')).to_have_value('3.00')
        _set(pg, 't2i_seed', 0)
        _set(pg, 't2i_n', 4)
        _set(pg, 't2i_steps', 50)
        _run(pg, 't2i')
        shown = _shown_images(pg, default_server, 't2i')
        vd = VersatileDiffusion.default()
        ref = vd.text_to_image([SHAPES_PROMPTS[0]], 4, negative_prompt='', height=vd.image_size,
                               width=vd.image_size, steps=50, scale=3.0, sampler='ddim',
                               eta=0.0, seed=0)
        _assert_images_match(shown, ref, 'text->image with VD-mini')
        shots(pg, 'vd_mini_text_to_image')
    finally:
        pg.close()


def test_no_request_left_localhost(browser):
    _, outside = browser
    assert not outside, f'the page requested outside addresses: {outside[:5]}'


# ---------------------------------------------------------------------------------------
# Without a browser: uploads, and tabs a model cannot serve
# ---------------------------------------------------------------------------------------
def test_decode_image_limits():
    from PIL import Image
    from vd_jax.demo.inputs import decode_image
    from vd_jax.demo.options import Limits
    buf = io.BytesIO()
    Image.new('RGB', (30, 20), (1, 2, 3)).save(buf, format='PNG')
    data = buf.getvalue()
    assert decode_image(data, 'a.png', Limits()).shape == (20, 30, 3)
    with pytest.raises(InputError, match=r"'a.png' is .* MB; the limit"):
        decode_image(data, 'a.png', Limits(max_bytes=len(data) - 1))
    with pytest.raises(InputError, match=r"30 x 20 = 600 pixels; the limit is 599"):
        decode_image(data, 'a.png', Limits(max_pixels=599))
    with pytest.raises(InputError, match='is empty'):
        decode_image(b'', 'e.png', Limits())
    with pytest.raises(InputError, match='cannot decode'):
        decode_image(data[:60], 'cut.png', Limits())  # truncated: header fine, pixels missing
    eps = b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n'  # never handed to Ghostscript
    with pytest.raises(InputError, match='not an image in a supported format'):
        decode_image(eps, 'x.eps', Limits())


def test_tabs_a_model_cannot_serve_are_disabled():
    """A model without the text VAE: its tabs are marked, explain why, and cannot run."""
    from streamlit.testing.v1 import AppTest
    from vd_jax.demo import model, options
    from vd_jax.pipeline import VersatileDiffusion
    vd = VersatileDiffusion.random('tiny', 0)
    del vd.params['vae_text']
    model.set_served(model.Served(vd, untrained=True))
    options.set_current(options.parse([]))
    try:
        at = AppTest.from_file(os.path.join(ROOT, 'vd_jax', 'demo', 'app.py'), default_timeout=60)
        at.run()
        assert not at.exception
        labels = [t.label for t in at.tabs if t.label != '' and not t.label.startswith('Image ')]
        off = {l for l in labels if l.endswith('(unavailable)')}
        assert off == {'Image-to-Text (unavailable)', 'Text-Variation (unavailable)',
                       'I2T2I Editor (unavailable)'}, labels
        warnings = [w.value for w in at.warning]
        assert len(warnings) == 3 and all("lacks ['vae_text']" in w for w in warnings), warnings
        runs = {b.key: b.disabled for b in at.button if b.key and b.key.endswith('_run')}
        assert runs == {'t2i_run': False, 'i2i_run': False, 'i2t_run': True, 't2t_run': True,
                        'dual_run': False, 'multi_run': False, 'dis_run': False,
                        'i2t2i_run': True}, runs
    finally:
        model.set_served(None)
        options.set_current(None)
