"""The default ``orchard-jax run`` study, driven by the reference's torch loop.

A standalone process: it imports torch, optuna, scikit-learn and numpy (as
the reference does), never jax or orchard_jax, so its wall time pays only the
reference's imports. Every setting is the bundled recipe's
(``orchard_jax/recipes/default.yaml``):

* data: scikit-learn digits (8x8x1, pixels / 16), split stratified by two
  ``train_test_split`` calls (test 0.15, then val 0.15 / 0.85 of the rest,
  ``random_state=0``) -- ``orchard_jax.study.sources._digits``; the tests
  check the arrays are equal;
* model: the reference's MiniCNN with dropout 0.1 before the head
  (:class:`torch_reference.TorchMiniCNN`), ``torch.manual_seed(42)`` per trial;
* training per trial: 6 epochs, batch 32 through a ``DataLoader`` whose
  sampler draws orchard_jax's shuffling order (``default_rng((42, pass))``),
  cross-entropy, ``clip_grad_norm_(1.0)``, SGD with momentum and coupled weight
  decay, ``CosineAnnealingLR(T_max=epochs, eta_min=min_lr)`` stepped per epoch
  (``min_lr`` capped to ``learning_rate``); validation batches of 256 under
  ``no_grad`` with loss, accuracy, ROC-AUC (one-vs-rest macro) and macro F1
  from scikit-learn every epoch; the monitored metric is accuracy (maximize);
* Optuna: ``TPESampler(seed=42)``, ``MedianPruner(n_startup_trials=4)`` asked
  from epoch 3 on (``trial.report(value, epoch)`` then ``should_prune()``),
  the search space ``learning_rate`` (1e-3..0.3, log), ``weight_decay``
  (1e-6..1e-3, log), ``momentum`` (0.85..0.95), ``min_lr`` (1e-7..1e-5, log)
  in that order, 12 trials, sqlite storage ``<out>/study.db``, study early
  stopping after 2 consecutive complete trials with accuracy >= 0.995, and
  a stop after 3 consecutive failed trials;
* outputs (unless ``--no-outputs``), as orchard_jax writes them: each trial's
  per-epoch history as a user attribute, the best epoch's weights of each
  complete trial (only the study's best kept), ``trials.csv``,
  ``best_params.json``, ``best_model/`` and the same four plots.

  python benchmarks/torch_study.py --out DIR [--params-json PATH] [--n-trials N] [--epochs E]

``--params-json`` is a JSON list of parameter dicts enqueued before the study
runs, so that it trains the same hyperparameters as an orchard_jax study. The
last line printed is one JSON object: wall time, trial counts, best value.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402
from torch.utils.data import DataLoader, Sampler, TensorDataset  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402

# The bundled recipe's values (tests/test_study_benchmark.py checks them against it).
STUDY = {
    "study_name": "digits_mini_cnn", "seed": 42, "val_fraction": 0.15, "test_fraction": 0.15,
    "split_seed": 0, "eval_batch_size": 256, "dropout": 0.1, "batch_size": 32, "grad_clip": 1.0,
    "monitor_metric": "accuracy", "direction": "maximize", "n_trials": 12, "epochs": 6,
    "pruning_warmup_epochs": 3, "pruner_startup_trials": 4, "early_stopping_threshold": 0.995,
    "early_stopping_patience": 2, "max_consecutive_failures": 3,
}
# (name, low, high, log), in orchard_jax's sampling order for the bundled recipe.
SPACE = (("learning_rate", 1e-3, 0.3, True), ("weight_decay", 1e-6, 1e-3, True),
         ("momentum", 0.85, 0.95, False), ("min_lr", 1e-7, 1e-5, True))


def digits_split(val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{'train'|'val'|'test': (images [N, 8, 8] float32 in [0, 1], labels [N] int64)}``."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  images, labels = load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8)
  rest_x, x_test, rest_y, y_test = train_test_split(
      images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed)
  x_train, x_val, y_train, y_val = train_test_split(
      rest_x, rest_y, test_size=val_fraction / (1 - test_fraction), stratify=rest_y,
      random_state=split_seed)
  return {"train": (x_train, y_train.astype(np.int64)), "val": (x_val, y_val.astype(np.int64)),
          "test": (x_test, y_test.astype(np.int64))}


def suggest(trial: optuna.Trial) -> dict[str, float]:
  """Samples the bundled recipe's search space on ``trial``."""
  return {name: trial.suggest_float(name, low, high, log=log) for name, low, high, log in SPACE}


class EpochOrder(Sampler):
  """orchard_jax's ``ArrayLoader`` order: pass ``k`` is ``default_rng((seed, k)).permutation(n)``.
  """

  def __init__(self, n: int, seed: int):
    self.n, self.seed, self.passes = n, seed, 0

  def __len__(self) -> int:
    return self.n

  def __iter__(self):
    order = np.random.default_rng((self.seed, self.passes)).permutation(self.n)
    self.passes += 1
    return iter(order.tolist())


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
  return TensorDataset(torch.from_numpy(x[:, None]), torch.from_numpy(y))  # NCHW


def classification_metrics(probs: np.ndarray, labels: np.ndarray, loss_sum: float) -> dict:
  """The reference's validation metrics (loss, accuracy, one-vs-rest macro AUC, macro F1)."""
  if len(labels) == 0:
    return {k: math.nan for k in ("loss", "accuracy", "auc", "f1")}
  preds = probs.argmax(1)
  try:
    auc = float(roc_auc_score(labels, probs[:, 1] if probs.shape[1] == 2 else probs,
                              multi_class="ovr", average="macro"))
  except ValueError:
    auc = math.nan
  return {"loss": loss_sum / len(labels), "accuracy": float((preds == labels).mean()),
          "auc": auc, "f1": float(f1_score(labels, preds, average="macro", zero_division=0))}


def train_trial(trial: optuna.Trial, params: dict[str, float], data: dict, *, epochs: int,
                warmup: int, settings: dict = STUDY, trial_dir: pathlib.Path | None = None,
                history: list | None = None) -> float:
  """One trial of the reference's executor; returns the best monitored value.

  Raises ``optuna.TrialPruned`` when the pruner stops it; writes the best
  epoch's weights to ``trial_dir`` when the trial completes.
  """
  seed = settings["seed"]
  torch.manual_seed(seed)
  model = ref.TorchMiniCNN(in_channels=1, num_classes=10, dropout=settings["dropout"])
  lr = params["learning_rate"]
  opt, sched = ref.make_optimizer(model, lr=lr, momentum=params["momentum"],
                                  weight_decay=params["weight_decay"], epochs=epochs,
                                  min_lr=min(params["min_lr"], lr))
  train = DataLoader(_tensors(*data["train"]), batch_size=settings["batch_size"],
                     sampler=EpochOrder(len(data["train"][1]), seed))
  val = DataLoader(_tensors(*data["val"]), batch_size=settings["eval_batch_size"])
  history = [] if history is None else history
  best, best_epoch, best_weights = -math.inf, None, None
  for epoch in range(1, epochs + 1):
    loss = ref.train_epoch(model, train, opt, sched, grad_clip=settings["grad_clip"])
    if not math.isfinite(loss):
      raise RuntimeError(f"Training diverged: loss={loss} at epoch {epoch}")
    metrics = classification_metrics(*ref.validate(model, val))
    value = metrics[settings["monitor_metric"]]
    history.append({"epoch": epoch, "train_loss": loss,
                    **{f"val_{k}": v for k, v in metrics.items()}})
    if not math.isnan(value) and value > best:
      best, best_epoch = value, epoch
      best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not math.isnan(value):
      trial.report(value, epoch)
    if epoch >= warmup and trial.should_prune():
      raise optuna.TrialPruned(f"Trial {trial.number} pruned at epoch {epoch}")
  if trial_dir is not None and best_weights is not None:
    trial_dir.mkdir(parents=True, exist_ok=True)
    torch.save(best_weights, trial_dir / "best.pt")
    (trial_dir / "best.json").write_text(json.dumps(
        {"epoch": best_epoch, "value": best, "metric": settings["monitor_metric"]}))
  return best


# ------------------------------------------------------------------ study --


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
  done = [t for t in study.get_trials(deepcopy=False)
          if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
  return min(done, key=lambda t: (-t.value, t.number)) if done else None


class StudyCallbacks:
  """orchard_jax's study callbacks: progress line, keep-best checkpoint, failure streak,
  early stopping after ``patience`` consecutive complete trials at the threshold."""

  def __init__(self, trials_dir: pathlib.Path | None, settings: dict = STUDY):
    self.trials_dir, self.settings, self.reached, self.failed = trials_dir, settings, 0, 0

  def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    best = _best(study)
    seconds = trial.duration.total_seconds() if trial.duration else math.nan
    print(f"Trial {trial.number} {trial.state.name} | value {trial.value} | epochs "
          f"{trial.last_step or 0} | {seconds:.1f} s | best "
          f"{'-' if best is None else f'{best.value:.4f} (trial {best.number})'}",
          file=sys.stderr, flush=True)
    if self.trials_dir is not None:
      for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and (best is None or t.number != best.number):
          shutil.rmtree(self.trials_dir / f"trial_{t.number}", ignore_errors=True)
    self.failed = self.failed + 1 if trial.state == TrialState.FAIL else 0
    ok = (trial.state == TrialState.COMPLETE and trial.value is not None
          and trial.value >= self.settings["early_stopping_threshold"])
    self.reached = self.reached + 1 if ok else 0
    if (self.failed >= self.settings["max_consecutive_failures"]
        or self.reached >= self.settings["early_stopping_patience"]):
      study.stop()


def write_outputs(study: optuna.Study, out: pathlib.Path) -> None:
  """trials.csv, best_params.json, best_model/ and the plots orchard_jax writes."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  from optuna.visualization import matplotlib as vis
  import warnings

  trials = study.get_trials(deepcopy=False)
  names = sorted({n for t in trials for n in t.params})
  with open(out / "trials.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["number", "state", "value", "epochs", "seconds",
                     *(f"params_{n}" for n in names)])
    for t in trials:
      writer.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                       t.last_step or 0, t.duration.total_seconds() if t.duration else "",
                       *(t.params.get(n, "") for n in names)])
  best = _best(study)
  plots = out / "plots"
  plots.mkdir(exist_ok=True)
  if best is not None:
    (out / "best_params.json").write_text(json.dumps({"number": best.number, "value": best.value,
                                                      "params": best.params}, indent=2))
    if (out / "trials" / f"trial_{best.number}").is_dir():
      shutil.copytree(out / "trials" / f"trial_{best.number}", out / "best_model",
                      dirs_exist_ok=True)
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  figures = {"optimization_history": (vis.plot_optimization_history, bool(complete)),
             "intermediate_values": (vis.plot_intermediate_values,
                                     any(t.intermediate_values for t in trials)),
             "param_importances": (vis.plot_param_importances, len(complete) >= 2)}
  for name, (plot, possible) in figures.items():
    if possible:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = plot(study)
      fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
      fig.savefig(plots / f"{name}.png", dpi=110, bbox_inches="tight")
      plt.close(fig)
  epochs = (best.user_attrs.get("history") or []) if best is not None else []
  if epochs:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = [e["epoch"] for e in epochs]
    left.plot(x, [e["train_loss"] for e in epochs], marker="o", label="train loss")
    left.plot(x, [e["val_loss"] for e in epochs], marker="o", label="val loss")
    right.plot(x, [e["val_accuracy"] for e in epochs], marker="o", label="val accuracy")
    for ax in (left, right):
      ax.grid(alpha=0.3)
      ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "best_trial_curves.png", dpi=110)
    plt.close(fig)


def run_study(out: pathlib.Path, params_list: list[dict] | None = None, *, n_trials: int,
              epochs: int, warmup: int, outputs: bool = True, settings: dict = STUDY) -> dict:
  """Runs the study into ``out`` (study.db and outputs); returns a summary."""
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  out.mkdir(parents=True, exist_ok=True)
  data = digits_split(settings["val_fraction"], settings["test_fraction"], settings["split_seed"])
  study = optuna.create_study(
      study_name=settings["study_name"], storage=f"sqlite:///{out.absolute() / 'study.db'}",
      direction=settings["direction"], sampler=optuna.samplers.TPESampler(seed=settings["seed"]),
      pruner=optuna.pruners.MedianPruner(n_startup_trials=settings["pruner_startup_trials"]))
  for params in params_list or ():
    study.enqueue_trial(params)
  trials_dir = out / "trials" if outputs else None

  def objective(trial: optuna.Trial) -> float:
    history: list = []
    try:
      params = suggest(trial)
      trial_dir = None if trials_dir is None else trials_dir / f"trial_{trial.number}"
      return train_trial(trial, params, data, epochs=epochs, warmup=warmup, settings=settings,
                         history=history, trial_dir=trial_dir)
    finally:
      trial.set_user_attr("history", history)

  start = time.perf_counter()
  study.optimize(objective, n_trials=n_trials, catch=(Exception,),
                 callbacks=[StudyCallbacks(trials_dir, settings)], gc_after_trial=False)
  study_s = time.perf_counter() - start
  if outputs:
    write_outputs(study, out)
  trials = study.get_trials(deepcopy=False)
  best = _best(study)
  return {
      "study_s": study_s,
      "trials": len(trials),
      "complete": sum(t.state == TrialState.COMPLETE for t in trials),
      "pruned": sum(t.state == TrialState.PRUNED for t in trials),
      "failed": sum(t.state == TrialState.FAIL for t in trials),
      "epochs_run": sum(t.last_step or 0 for t in trials),
      "best_value": None if best is None else best.value,
      "best_trial": None if best is None else best.number,
      "trial_seconds": [t.duration.total_seconds() if t.duration else None for t in trials],
      "torch_threads": torch.get_num_threads(),
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for study.db and the outputs")
  parser.add_argument("--params-json", help="JSON list of parameter dicts to enqueue")
  parser.add_argument("--n-trials", type=int, default=STUDY["n_trials"])
  parser.add_argument("--epochs", type=int, default=STUDY["epochs"])
  parser.add_argument("--warmup", type=int, default=STUDY["pruning_warmup_epochs"],
                      help="first epoch a trial may be pruned at (must be < --epochs)")
  parser.add_argument("--threads", type=int, default=None,
                      help="torch.set_num_threads(N) (default: torch's own choice, as the "
                           "reference; a diagnostic for a CPU shared with other processes)")
  parser.add_argument("--no-outputs", action="store_true",
                      help="skip checkpoints, trials.csv and plots (study.db only)")
  args = parser.parse_args(argv)
  if args.warmup >= args.epochs:
    parser.error(f"--warmup must be < --epochs, got warmup={args.warmup}, epochs={args.epochs}")
  if args.threads is not None:
    torch.set_num_threads(args.threads)
  params_list = None
  if args.params_json:
    params_list = json.loads(pathlib.Path(args.params_json).read_text())
  summary = run_study(pathlib.Path(args.out), params_list, n_trials=args.n_trials,
                      epochs=args.epochs, warmup=args.warmup, outputs=not args.no_outputs)
  print(json.dumps({"wall_s": time.perf_counter() - _START, **summary}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
