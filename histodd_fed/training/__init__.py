"""Patch-classifier training, evaluation, metrics and checkpoints."""

from histodd_fed.training.checkpoint import load_model, save_model
from histodd_fed.training.evaluation import (SetEvaluation, build_seeded_model, evaluate_classifier, evaluate_sets,
                                             predict_probs)
from histodd_fed.training.metrics import Metrics, binary_auc, compute_metrics, roc_auc
from histodd_fed.training.trainer import TrainResult, fine_tune, train_classifier

__all__ = ["Metrics", "SetEvaluation", "TrainResult", "binary_auc", "build_seeded_model", "compute_metrics",
           "evaluate_classifier", "evaluate_sets", "fine_tune", "load_model", "predict_probs", "roc_auc",
           "save_model", "train_classifier"]
