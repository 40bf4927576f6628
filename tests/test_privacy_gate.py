"""The export gate blocks near copies, records the override, and the audit writes its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from histodd_fed.patchset import PatchSet
from histodd_fed.privacy.audit import AuditConfig, run_audit
from histodd_fed.privacy.gate import GateDecision, PrivacyRiskError, check_export

REPO = Path(__file__).resolve().parents[1]


def textured(n: int, seed: int, size: int = 16) -> PatchSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    low = rng.random((n, 4, 4, 3))
    low[labels == 1, :, :, 0] *= 0.5
    img = 0.8 * np.kron(low, np.ones((size // 4, size // 4, 1))) + 0.2 * rng.random((n, size, size, 3))
    return PatchSet(images=(img * 255).round().astype(np.uint8), labels=labels, class_names=["a", "b"])


def tiny_config(features: bool = False, copies: bool = False, **gate) -> AuditConfig:
    # the copy detector is off here: these tests isolate the calibrated rules (tests/test_privacy_copies.py has it)
    return AuditConfig.from_dict({
        "seed": 0, "closest_pairs": 4, "copies": {"enabled": copies},
        "memorisation": {"reference_size": 60, "ssim_candidates": 8, "feature_metric": features,
                         "encoder": {"model": "convnet", "model_kwargs": {"width": 8, "depth": 2}, "epochs": 1}},
        "membership": {"max_per_side": 40, "target": {"model": "convnet", "model_kwargs": {"width": 8, "depth": 2},
                                                      "epochs": 5, "augmentation": "flip"}},
        "gate": gate})


@pytest.fixture(scope="module")
def real():
    return textured(60, 0)


def test_gate_blocks_a_coreset_with_a_one_line_message(real):
    core = real.subset([2, 33], kind="coreset")
    with pytest.raises(PrivacyRiskError) as err:
        check_export(core, real, tiny_config(), accept_risk=False)
    msg = str(err.value)
    assert "\n" not in msg and "synthetic patch 0" in msg and "real patch 2" in msg and "threshold 0.95" in msg
    assert "--accept-privacy-risk" in msg
    assert err.value.decision.blocked and not err.value.decision.passed


def test_override_is_recorded_in_the_manifest_report(real):
    core = real.subset([2, 33], kind="coreset")
    d = check_export(core, real, tiny_config(), accept_risk=True)
    assert isinstance(d, GateDecision) and not d.passed and not d.blocked and d.accepted_risk
    manifest = json.loads(json.dumps(d.to_dict()))  # what the bundle seals: plain JSON
    assert manifest["accepted_risk"] is True and manifest["gate"]["accepted_risk"] is True
    assert manifest["gate"]["reasons"] and manifest["flagged"] is True
    assert manifest["ssim"]["closest_pair"] == [0, 2]


def test_noise_passes_the_gate_with_the_attack(real):
    rng = np.random.default_rng(9)
    noise = PatchSet(images=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1]),
                     class_names=["a", "b"], kind="synthetic")
    d = check_export(noise, real, tiny_config(auc_block=0.95), holdout=textured(40, 1))
    assert d.passed and not d.blocked and not d.accepted_risk and d.reasons == []
    assert d.summary["membership"]["n_per_side"] == 40
    assert d.to_dict()["accepted_risk"] is False


def test_auc_rule_fires(real):
    core = real.subset(np.arange(20), kind="coreset")
    d = check_export(core, real, tiny_config(ssim_block=None, l2_block_percentile=None, structure_block_percentile=None,
                                             auc_block=0.0),
                     accept_risk=True, holdout=textured(40, 1))
    assert len(d.reasons) == 1 and "membership inference" in d.reasons[0] and "> limit 0.0" in d.reasons[0]


def test_structure_rule_catches_a_noisy_recoloured_copy(real):
    # real patches + strong pixel noise + a colour cast: far in L2, low SSIM, same layout
    rng = np.random.default_rng(3)
    src = real.images[:10].astype(np.float32) / 255
    noisy = np.clip(src * np.array([0.8, 1.1, 0.9]) + rng.normal(0, 0.3, src.shape), 0, 1)
    fake = PatchSet(images=(noisy * 255).round().astype(np.uint8), labels=real.labels[:10],
                    class_names=real.class_names, kind="synthetic")
    only_old = check_export(fake, real, tiny_config(structure_block_percentile=None, auc_block=None), accept_risk=True)
    assert only_old.passed, only_old.reasons            # SSIM and L2 miss it
    d = check_export(fake, real, tiny_config(auc_block=None), accept_risk=True)
    assert len(d.reasons) == 1 and "keeps the layout of real patch" in d.reasons[0], d.reasons
    # the unrelated images of another seed do not fire the rule
    other = textured(10, 11)
    fresh = PatchSet(images=other.images, labels=other.labels, class_names=other.class_names, kind="synthetic")
    assert check_export(fresh, real, tiny_config(auc_block=None), accept_risk=True).passed


def test_the_reference_comes_from_the_centre_never_from_the_sets_meta(real, tmp_path):
    # a set naming a decoy folder in its meta: the gate does not use it; without --patches / real_patches it refuses
    real.save(tmp_path / "real")
    core = real.subset([5], kind="coreset", meta={"source": str(tmp_path / "real")})
    core.save(tmp_path / "core")
    with pytest.raises(PrivacyRiskError, match="no reference"):
        check_export(patchset=core, synthetic_dir=tmp_path / "core", accept_risk=False, config=tiny_config())
    # --accept-privacy-risk does not turn a missing reference into an export
    d = check_export(patchset=core, accept_risk=True, config=tiny_config(), raise_on_block=False)
    assert d.blocked and not d.audited and d.to_dict()["gate"]["audited"] is False
    # the centre's own reference (real_dir, as `export --patches` passes it) audits it
    with pytest.raises(PrivacyRiskError, match="real patch 5"):
        check_export(patchset=core, real_dir=tmp_path / "real", accept_risk=False, config=tiny_config())


def test_run_audit_writes_markdown_json_png(real, tmp_path):
    core = real.subset([2, 7], kind="coreset", meta={"source_indices": [2, 7], "source_size": 60})
    rep = run_audit(core, real, textured(40, 1), tiny_config(features=True), out_dir=tmp_path / "audit")
    out = tmp_path / "audit"
    for f in ("audit.md", "audit.json", "closest_pairs.png", "nn_distribution.png", "roc.png", "run_config.json"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "closest_pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = json.loads((out / "audit.json").read_text())
    assert full["summary"]["flagged"] and len(full["per_synthetic"]) == 2 and "cosine" in full["summary"]
    assert full["per_synthetic"][0]["ssim_nn_index"] == 2 and full["per_synthetic"][0]["init_index"] == 2
    assert "FLAGGED" in (out / "audit.md").read_text()
    assert len(json.dumps(rep.summary())) < 3000


def test_config_rejects_unknown_keys():
    from histodd_fed.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        AuditConfig.from_dict({"gate": {"ssim_blok": 0.9}})
    cfg = AuditConfig.from_yaml(REPO / "configs" / "privacy.yaml", seed=7)
    assert cfg.seed == 7 and cfg.gate.ssim_block == 0.95 and cfg.membership.fprs == (0.01, 0.001)


def test_cli_audit_and_bad_input(real, tmp_path):
    real.save(tmp_path / "real")
    real.subset([1, 2], kind="coreset").save(tmp_path / "core")
    env = {**os.environ, "HISTODD_NO_PROGRESS": "1"}
    cfg = tmp_path / "p.yaml"
    import yaml
    from histodd_fed.runconfig import to_jsonable
    cfg.write_text(yaml.safe_dump(to_jsonable(tiny_config())))
    from typer.testing import CliRunner

    from centre_node.cli import app

    r = CliRunner().invoke(app, ["-q", "audit", "--synthetic", str(tmp_path / "core"), "--patches", str(tmp_path / "real"),
                                 "--out", str(tmp_path / "rep"), "--config", str(cfg), "--no-membership", "--fail-on-risk"],
                           env=env)
    assert r.exit_code == 3, r.output
    assert "FLAGGED" in r.output and (tmp_path / "rep" / "audit.md").exists()
    assert json.loads((tmp_path / "rep" / "run_config.json").read_text())["config"]["audit"]["seed"] == 0
    r = subprocess.run([sys.executable, "-m", "centre_node.cli", "audit", "--synthetic", str(tmp_path / "nope"),
                        "--patches", str(tmp_path / "real")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nope" in r.stderr
