"""Bad data through run_trial with real Optuna studies: FAIL with the data's message, never a value.

Deterministic bad data (labels, shapes, empty loaders, a loader that raises,
non-finite training inputs) raise DataError, which fails the trial whatever
``reraise_errors`` says. Non-finite validation logits are a failed validation
instead: the fallback and the three-strike rule apply, as in the reference;
but a trial whose every validation failed is FAIL with the reason, never the
fallback's value.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import optuna
import pytest
import torch

from orchard_jax.engine import fit, run_trial
from orchard_jax.errors import (DataError, EmptyLoaderError, LoaderError, NonFiniteInputError,
                                ValidationFailedError)

FAIL, COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE


def optimize(study, cfg, raises=None):
  """One trial of ``study`` through run_trial; returns it (FrozenTrial)."""
  if raises is None:
    study.optimize(lambda trial: run_trial(trial, cfg), n_trials=1)
  else:
    with pytest.raises(raises):
      study.optimize(lambda trial: run_trial(trial, cfg), n_trials=1)
  (trial,) = study.trials
  return trial


def batches(images, labels, size=16):
  return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]


@pytest.fixture
def val_data(make_cfg):
  """Copies of make_cfg's validation images and labels: 48 rows, 3 batches of 16."""
  loader = make_cfg().val_loader
  return (np.concatenate([b[0] for b in loader]).copy(),
          np.concatenate([b[1] for b in loader]).copy())


class PerEpoch:
  """A re-iterable loader that yields ``make(epoch)``'s batches at its ``epoch``-th pass."""

  def __init__(self, make):
    self.make, self.epoch = make, 0

  def __iter__(self):
    self.epoch += 1
    return iter(self.make(self.epoch))


# ---------------------------------------------------------- 7: validation data errors
@pytest.mark.parametrize("reraise_errors", [False, True])
@pytest.mark.parametrize("bad, message", [
    (12, r"validation labels must be in [0, 3), got 12 in batch 1 (epoch 1)"),
    (-1, r"validation labels must be in [0, 3), got -1 in batch 1 (epoch 1)"),
])
def test_a_bad_validation_label_fails_the_trial_with_its_value(val_data, make_cfg, study_factory,
                                                               reraise_errors, bad, message):
  images, labels = val_data
  labels[20] = bad  # batch 1
  cfg = make_cfg(val_loader=batches(images, labels), reraise_errors=reraise_errors)
  trial = optimize(study_factory(), cfg, raises=DataError)
  assert trial.state == FAIL and trial.value is None
  assert trial.user_attrs["error"] == f"DataError: {message}"
  assert trial.intermediate_values == {}  # no fallback value was reported


def test_float_validation_labels_fail_the_trial(val_data, make_cfg, study_factory):
  images, labels = val_data
  cfg = make_cfg(val_loader=batches(images, labels.astype(np.float64)))
  trial = optimize(study_factory(), cfg, raises=DataError)
  assert trial.state == FAIL
  assert trial.user_attrs["error"] == ("DataError: validation labels must be integer class ids, "
                                       "got dtype float64 in batch 0 (epoch 1)")


def test_validation_images_of_the_wrong_shape_fail_the_trial(val_data, make_cfg, study_factory):
  images, labels = val_data
  cfg = make_cfg(val_loader=batches(images[:, :, :5, :5], labels))
  trial = optimize(study_factory(), cfg, raises=DataError)
  assert trial.state == FAIL
  assert trial.user_attrs["error"] == (
      "DataError: validation inputs have per-sample shape (5, 5, 1) (channels last) in batch 0 "
      "(epoch 1), but the model's input shape is (8, 8, 1)")


def test_a_validation_loader_that_raises_fails_the_trial_at_its_first_failure(
    val_data, make_cfg, study_factory, caplog):
  good = batches(*val_data)

  def flaky(epoch):  # fails in 2 of every 3 epochs
    if epoch % 3 != 1:
      raise RuntimeError("flaky read")
    return good

  cfg = make_cfg(val_loader=PerEpoch(flaky), optuna={"epochs": 6})
  trial = optimize(study_factory(), cfg, raises=LoaderError)
  assert trial.state == FAIL and list(trial.intermediate_values) == [1]
  assert trial.user_attrs["error"] == ("LoaderError: validation loader raised RuntimeError: "
                                       "flaky read while reading batch 0 (epoch 2)")
  assert "Validation failed" not in caplog.text  # not a failed validation: no fallback


def test_a_training_loader_that_raises_keeps_the_original_as_the_cause(make_cfg, study_factory):
  def broken(epoch):
    raise KeyError("label")

  cfg = make_cfg(train_loader=PerEpoch(broken), input_shape=(8, 8, 1))
  study = study_factory()
  with pytest.raises(LoaderError) as info:
    study.optimize(lambda trial: run_trial(trial, cfg), n_trials=1)
  assert study.trials[0].state == FAIL
  assert isinstance(info.value.__cause__, KeyError)
  assert str(info.value) == ("training loader raised KeyError: 'label' while reading batch 0 "
                             "(epoch 1)")


# ------------------------------------------------- 8: non-finite validation outputs
def test_all_nan_validation_images_fail_three_times_and_abort(val_data, make_cfg, study_factory,
                                                              caplog):
  images, labels = val_data
  images[:] = np.nan
  cfg = make_cfg(val_loader=batches(images, labels), reraise_errors=True)
  trial = optimize(study_factory(), cfg, raises=RuntimeError)
  assert trial.state == FAIL
  assert trial.user_attrs["error"] == (
      "RuntimeError: Validation failed 3 consecutive times, aborting trial")
  assert trial.intermediate_values == {1: 0.0, 2: 0.0}  # the fallback's auc
  for strike in (1, 2, 3):
    assert (f"Validation failed (x{strike}) at epoch {strike}: 48 of 48 validation rows have "
            f"non-finite logits (48 have NaN or Inf inputs)") in caplog.text


NAN_ROWS = "ValueError: 48 of 48 validation rows have non-finite logits (48 have NaN or Inf inputs)"


@pytest.mark.parametrize("reraise_errors", [False, True])
@pytest.mark.parametrize("epochs", [1, 2])
def test_a_short_trial_whose_every_validation_failed_is_fail_not_the_fallback_value(
    val_data, make_cfg, study_factory, caplog, tmp_path, epochs, reraise_errors):
  images, labels = val_data
  images[:] = np.nan
  cfg = make_cfg(val_loader=batches(images, labels), optuna={"epochs": epochs},
                 reraise_errors=reraise_errors, output_dir=tmp_path / "trials")
  storage = f"sqlite:///{tmp_path / 'study.db'}"
  study = study_factory(storage=storage)
  optimize(study, cfg, raises=ValidationFailedError)
  (trial,) = optuna.load_study(study_name=study.study_name, storage=storage).trials
  assert trial.state == FAIL and trial.value is None  # not COMPLETE with the fallback's 0.0
  reason = f"every validation failed ({epochs} of {epochs} epochs): {NAN_ROWS}"
  assert trial.user_attrs["error"] == f"ValidationFailedError: {reason}"
  assert f"Trial 0 failed: ValidationFailedError: {reason}" in caplog.text
  assert not (tmp_path / "trials" / "trial_0").exists()  # no checkpoint of a fallback epoch


def test_fit_whose_every_validation_failed_raises_the_reason_not_the_fallback(val_data, make_cfg):
  images, labels = val_data
  images[:] = np.nan
  cfg = make_cfg(val_loader=batches(images, labels), training={"epochs": 2})
  with pytest.raises(ValidationFailedError,
                     match=rf"^every validation failed \(2 of 2 epochs\): {re.escape(NAN_ROWS)}$"):
    fit(cfg)
  # stopped early (patience 1) after one failed epoch: no value either
  with pytest.raises(ValidationFailedError, match=r"^every validation failed \(1 of 1 epochs\)"):
    fit(cfg.replace(training=cfg.training.replace(epochs=5, patience=1)))


def test_a_tenth_of_nan_validation_rows_in_one_epoch_uses_the_fallback_and_is_logged(
    val_data, make_cfg, study_factory, caplog):
  clean = val_data
  dirty = (clean[0].copy(), clean[1])
  dirty[0][[0, 11, 22, 33, 44], 0, 4, 4] = np.nan  # 5 of 48 rows, about 10 %
  # Pass 2 is epoch 2's validation; pass 3 the second look at its inputs that non-finite
  # logits call for; pass 4 is epoch 3's.
  cfg = make_cfg(val_loader=PerEpoch(lambda n: batches(*(dirty if n in (2, 3) else clean))),
                 fallback_metrics={"auc": 0.25})
  trial = optimize(study_factory(), cfg)
  assert trial.state == COMPLETE
  values = trial.intermediate_values
  assert values[2] == 0.25 and values[1] != 0.25 and values[3] != 0.25
  assert trial.value == max(values[1], values[3]) and "error" not in trial.user_attrs
  assert ("Validation failed (x1) at epoch 2: 5 of 48 validation rows have non-finite logits "
          "(5 have NaN or Inf inputs)") in caplog.text


# ---------------------------------------------------------------- 9: empty loaders
def test_an_empty_validation_loader_fails_the_trial(make_cfg, study_factory):
  trial = optimize(study_factory(), make_cfg(val_loader=[]), raises=EmptyLoaderError)
  assert trial.state == FAIL
  assert trial.user_attrs["error"] == (
      "EmptyLoaderError: the validation loader yielded no batch at epoch 1")


def test_an_empty_training_loader_with_an_input_shape_fails_the_trial(make_cfg, study_factory):
  empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
      torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)), batch_size=16)
  cfg = make_cfg(train_loader=empty, input_shape=(8, 8, 1))
  trial = optimize(study_factory(), cfg, raises=EmptyLoaderError)
  assert trial.state == FAIL
  assert trial.user_attrs["error"] == (
      "EmptyLoaderError: the training loader yielded no batch at epoch 1")


def test_an_empty_training_loader_without_an_input_shape_fails_the_trial(make_cfg, study_factory):
  trial = optimize(study_factory(), make_cfg(train_loader=[]), raises=EmptyLoaderError)
  assert trial.state == FAIL
  assert trial.user_attrs["error"] == ("EmptyLoaderError: the training loader yielded no batch, "
                                       "so the input shape cannot be inferred from it")


def test_fit_raises_on_an_empty_validation_loader(make_cfg):
  with pytest.raises(EmptyLoaderError, match="^the validation loader yielded no batch at epoch 1$"):
    fit(make_cfg(val_loader=[]))


# ------------------------------------------------- 10: non-finite training inputs
def test_nan_training_images_are_reported_as_bad_data_not_divergence(make_cfg, study_factory,
                                                                   train_data, caplog):
  images, labels = train_data
  images = images.copy()
  images[[3, 40, 79], 0, 2, 2] = np.nan
  cfg = make_cfg(train_loader=batches(images, labels))
  trial = optimize(study_factory(), cfg, raises=NonFiniteInputError)
  assert trial.state == FAIL
  assert trial.user_attrs["error"] == (
      "NonFiniteInputError: training inputs: 3 rows with NaN or Inf at epoch 1; fix the data "
      "(this is not divergence)")
  assert "Trial 0 failed on bad data: NonFiniteInputError" in caplog.text
  assert "diverged" not in caplog.text


# ----------------------------------------------------------- weighted loss labels
def test_a_bad_training_label_read_for_class_weights_fails_the_trial(make_cfg, study_factory,
                                                                     train_data):
  images, labels = train_data
  labels = labels.copy()
  labels[70] = 5
  cfg = make_cfg(train_loader=batches(images, labels), input_shape=(8, 8, 1),
                 training={"weighted_loss": True})
  trial = optimize(study_factory(), cfg, raises=DataError)
  assert trial.state == FAIL
  assert trial.user_attrs["error"] == ("DataError: training labels (for weighted_loss): labels "
                                       "must be in [0, 3), got [5]")


def test_other_failures_keep_the_reference_s_worst_value(make_cfg, study_factory):
  def broken(state, loader, *, epoch, layout):
    raise OSError("not data: the adapter's own bug")
  trial = optimize(study_factory(), make_cfg(validate_fn=broken))
  assert trial.state == COMPLETE and trial.value == float("-inf")
  assert trial.user_attrs["error"] == "OSError: not data: the adapter's own bug"
