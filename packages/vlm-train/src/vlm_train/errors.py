"""User-facing errors: the CLI prints them as one ``error: ...`` line."""

from __future__ import annotations

from vlm_data import errors as _data_errors

__all__ = [
    "CaptionTooLongError",
    "ConfigError",
    "DataError",
    "TrainingInterrupted",
    "VLMTrainError",
]


class VLMTrainError(Exception):
    """Base of the errors caused by bad input (files, data, checkpoints), not by bugs."""


# Data errors are raised by vlm-data (which cannot depend on vlm-train); the same
# classes are re-exported here.  They are ``ValueError``s, not ``VLMTrainError``s.
DataError = _data_errors.DataError
CaptionTooLongError = _data_errors.CaptionTooLongError


class ConfigError(VLMTrainError, ValueError):
    """A job config that validates but cannot be used as given: its model cannot be
    built, or it cannot resume the run already in its ``train.output_dir``.

    ``vlm train`` prefixes the message with the config file's name.
    """


class TrainingInterrupted(KeyboardInterrupt):
    """A second Ctrl-C arrived while a checkpoint was being saved.

    It is raised only after that save completed; the message names the complete
    checkpoint (``checkpoint step_000042 is complete``).  ``vlm train`` prints
    ``interrupted; <message>`` and exits with 130.
    """
