"""The ``[data]`` section: a discriminated union over the ``vlm.datasets`` group."""

from __future__ import annotations

import warnings

import pytest
from config_helpers import base_job
from pydantic import ValidationError

from vlm_config import ConfigDeprecationWarning, DatasetConfig, JobConfig, dump_toml


def test_data_defaults_to_digits_and_common_fields(registered: object) -> None:
    job = JobConfig.model_validate(base_job())
    assert job.data.type == "digits" and isinstance(job.data, DatasetConfig)
    assert job.data.num_workers == 2 and job.data.on_bad_sample == "error"
    job = JobConfig.model_validate(base_job(data={"type": "test_manifest", "train_file": "a"}))
    assert type(job.data).__name__ == "ManifestDataConfig"
    assert 'type = "test_manifest"' in dump_toml(job)


def test_data_errors_name_the_field(registered: object) -> None:
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(base_job(data={"type": "nope"}))
    assert "no vlm.datasets plugin named 'nope'" in str(info.value)
    assert "test_manifest" in str(info.value)  # lists the installed names
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(base_job(data={"type": "test_manifest"}))
    assert "data.test_manifest.train_file" in str(info.value)
    with pytest.raises(ValidationError, match="on_bad_sample"):
        JobConfig.model_validate(base_job(data={"on_bad_sample": "ignore"}))


def test_legacy_source_is_rewritten_with_a_warning(registered: object) -> None:
    old = {"source": "digits", "augment_shift": 1, "min_frames": 2, "eval_batch_size": 8}
    with pytest.warns(ConfigDeprecationWarning) as caught:
        job = JobConfig.model_validate(base_job(data=old))
    message = str(caught[0].message)
    assert "source = 'digits' -> type = 'digits'" in message
    assert "dropped fields the 'digits' dataset does not use: min_frames" in message
    assert job.data.type == "digits" and job.data.eval_batch_size == 8
    assert job.data.augment_shift == 1  # type: ignore[attr-defined]


def test_legacy_errors(registered: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecationWarning)
        with pytest.raises(ValidationError, match="not a source of the old"):
            JobConfig.model_validate(base_job(data={"source": "webcam"}))
        with pytest.raises(ValidationError, match="give only 'type'"):
            JobConfig.model_validate(base_job(data={"source": "digits", "type": "digits"}))


def test_schema_documents_datasets(registered: object) -> None:
    schema = JobConfig.model_json_schema()
    text = str(schema)
    assert "ManifestDataConfig" in text and "on_bad_sample" in text


@pytest.mark.usefixtures("registered")
def test_job_without_data_and_without_a_digits_plugin_gets_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model-only install (no vlm-data) validates jobs that omit ``[data]``; the
    ``none`` dataset (vlm-config's own entry point) refuses to build, naming the fix."""
    from vlm_config import NoDatasetConfig, get_registry
    from vlm_config.data import build_no_dataset

    registry = get_registry()
    names = registry.names
    monkeypatch.setattr(
        registry,
        "names",
        lambda group: [n for n in names(group) if not (group == "vlm.datasets" and n == "digits")],
    )
    job = JobConfig.model_validate(base_job())
    assert isinstance(job.data, NoDatasetConfig)
    assert job.data.type == "none"
    with pytest.raises(ValueError, match=r"install vlm-data"):
        build_no_dataset(job.data)
