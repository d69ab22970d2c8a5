"""The base of vd_jax's tfds builders: local data in, ArrayRecord out, nothing downloaded.

Three builders derive from `LocalBuilder`: raw image-caption folders and tar shards
(`vd_jax.data.builder.VdImageText`), the generated shapes world (`vd_jax.data.shapes.ShapesWorld`)
and pre-encoded records (`vd_jax.data.preencode.VdEncoded`). No TensorFlow is needed: builders
yield already-encoded image bytes, ArrayRecord is written by the `array_record` package, and a
prepared dataset is read through `as_data_source()` (random access), which is what grain wants.
"""
from __future__ import annotations

import inspect
import logging
import os
import shutil

import tensorflow_datasets as tfds
from etils import epath

from vd_jax.platform import quiet_tfds

logger = logging.getLogger(__name__)


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tfds builder of local data: version 1.0.0, its own source file as `code_path`, and
    tfds' "downloading" console lines replaced by `build_message` / `done_message` logged
    through `logging`. Subclasses define `_info`, `_split_generators`, `_generate_examples`."""
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First version.'}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds' default looks the module up through `importlib_resources`, a package tfds
        # 4.9.10 uses but does not declare (fails for builders inside an installed package).
        return epath.Path(inspect.getfile(cls))

    def build_message(self) -> str:
        """Logged when preparation starts."""
        return f'building {self.name}/{self.builder_config.name} in {self.data_dir}'

    def done_message(self) -> str:
        """Logged when preparation ends."""
        return f'built {self.name} in {self.data_dir}'

    # tfds prints "Downloading and preparing dataset Unknown size ..." (and a "downloaded"
    # line) to stdout; nothing is downloaded here, so say what happens through our logger.
    def _log_download_bytes(self) -> None:
        logger.info('%s', self.build_message())

    def _log_download_done(self) -> None:
        logger.info('%s', self.done_message())


def prepare_locally(builder: LocalBuilder, data_dir: str) -> None:
    """`builder.download_and_prepare()` with tfds' log noise off (`quiet_tfds`).

    A failed build removes the folders it created under `data_dir` (it leaves nothing behind),
    and the empty `downloads/` folder tfds' download manager makes is removed either way.
    """
    downloads = os.path.join(data_dir, 'downloads')
    created = [p for p in (data_dir, downloads, os.path.join(data_dir, builder.name),
                           os.path.join(data_dir, builder.name, builder.builder_config.name))
               if not os.path.lexists(p)]
    try:
        with quiet_tfds():
            builder.download_and_prepare()
    except BaseException:
        for p in created:
            shutil.rmtree(p, ignore_errors=True)
        raise
    if downloads in created and not any(fs for _, _, fs in os.walk(downloads)):
        shutil.rmtree(downloads, ignore_errors=True)  # nothing is downloaded for local sources
