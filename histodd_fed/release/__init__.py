"""What sits above both the privacy layer and the set builders (distillation, coresets).

- :mod:`histodd_fed.release.recipes`  :func:`recipe_from_set`: a released set's recipe, rebuilt from its
  meta as ``make_set(real, seed) -> PatchSet`` (the shadow sets of LiRA, histodd_fed.privacy.lira)
- :mod:`histodd_fed.release.choose`   distil -> choose -> audit: the gate-aware candidate check (the export
  gate's calibrated rules on the centre's raw reference) and :func:`release_verdict`, the full export gate
  (the call ``centre-node export`` makes) that ``distill`` reports for the set it writes
"""
