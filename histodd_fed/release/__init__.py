"""What sits above both the privacy layer and the set builders (distillation, coresets).

- :mod:`histodd_fed.release.recipes`  :func:`recipe_from_set`: a released set's recipe, rebuilt from its
  meta as ``make_set(real, seed) -> PatchSet`` (the shadow sets of LiRA, histodd_fed.privacy.lira)
"""
