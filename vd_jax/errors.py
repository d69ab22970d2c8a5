"""The errors vd_jax raises on purpose: one class per concern, all under `VdJaxError`.

Every message names what is wrong (the key, flag, file or shape) and, where there is one, the
way out. The command lines turn the input errors into exit code 2 before any long work.

  ConfigError       a model / training / sampling setting that cannot be used: an unknown key or
                    value, an impossible schedule, a mesh or rule set that cannot work, a bad
                    LoRA setting (targets, ranks, scale, mode) or observability setting
  CheckpointError   a weights file or folder that cannot be read, converted or written: vd_jax
                    checkpoints, source checkpoints for conversion, the CKPT of an export, LoRA
                    adapter files (and adapters that do not fit the model), tokenizer
                    vocabularies, the FID Inception weights
  InputError        what a caller hands a command or task that cannot be used: flags, prompts,
                    images, uploads, output locations (an export's OUT too), task arguments,
                    metric inputs; the command lines' usage errors are this class
  DataSourceError   sources that cannot make a training dataset
  TrainingDiverged  a training step produced a non-finite loss or gradient (nothing of it saved)
  GateFailed        a stage-0 quality gate did not pass (`.result` is its record)

The first four are `ValueError`s (a value the caller gave is wrong); the last two are
`RuntimeError`s (the run itself went wrong).
"""
from __future__ import annotations


class VdJaxError(Exception):
    """Base of every error vd_jax raises on purpose."""


class ConfigError(VdJaxError, ValueError):
    """A config value or override that cannot be used (the message names the key)."""


class CheckpointError(VdJaxError, ValueError):
    """A weights file or folder that is missing, partial, malformed or cannot be converted or
    written (the message names the file and the key)."""


class InputError(VdJaxError, ValueError):
    """A flag, prompt, image, upload, output location or task argument that cannot be used."""


class DataSourceError(VdJaxError, ValueError):
    """The given sources cannot make a training dataset; the message names the sources and
    what was found."""


class TrainingDiverged(VdJaxError, RuntimeError):
    """The loss or gradient became NaN/inf; nothing of that step was saved."""


class GateFailed(VdJaxError, RuntimeError):
    """A stage-0 gate did not pass; `.result` is its record."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
