"""Privacy audit of synthetic patch sets (memorisation, membership inference) and the export gate.

- :mod:`histodd_fed.image_similarity`      SSIM (gaussian window), normalised L2, cosine distance
- :mod:`histodd_fed.privacy.memorisation` nearest real patch of each synthetic patch vs real-real NN
- :mod:`histodd_fed.privacy.membership`   loss / confidence threshold attacks, ROC, TPR at low FPR
- :mod:`histodd_fed.privacy.audit`        :func:`run_audit` -> :class:`AuditReport` (JSON, Markdown, PNG)
- :mod:`histodd_fed.privacy.gate`         :func:`check_export` -> :class:`GateDecision`, :class:`PrivacyRiskError`

Submodules import torch; import them directly (``from histodd_fed.privacy.audit import run_audit``).
"""
