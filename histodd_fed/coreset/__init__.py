"""Coreset baselines (Random, Herding, Forgetting): a few real patches per class."""

from histodd_fed.coreset.builders import METHODS, CoresetConfig, build_coreset, extract_features
from histodd_fed.coreset.selection import (count_forgetting_events, forgetting_scores, forgetting_select,
                                           herding_order, herding_select, random_select)

__all__ = ["METHODS", "CoresetConfig", "build_coreset", "count_forgetting_events", "extract_features",
           "forgetting_scores", "forgetting_select", "herding_order", "herding_select", "random_select"]
