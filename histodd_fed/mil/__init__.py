"""Slide-level classification: bags of patch features and multiple-instance learning heads.

- :mod:`bags`      ``Bag`` and ``bags_from_patchset`` (one bag per slide)
- :mod:`features`  ``PatchEncoder`` (a patch model's ``features()``), per-slide feature cache
- :mod:`abmil`, :mod:`clam`, :mod:`dsmil`, :mod:`transmil`  MIL heads, registered by name
- :mod:`registry`  ``register_mil`` / ``create_mil`` / ``list_mil``
- :mod:`train`     ``train_mil``, ``evaluate_mil``, save / load, mean +- std over seeds
- :mod:`study`     ``run_mil_study``: distilled bags vs full bags (Histo-DD Table 4 analogue)
"""

from histodd_fed.mil.registry import create_mil, list_mil, register_mil

__all__ = ["create_mil", "list_mil", "register_mil"]
