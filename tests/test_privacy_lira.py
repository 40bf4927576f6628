"""LiRA (histodd_fed.privacy.lira), the recipe rebuilt from a set (histodd_fed.release.recipes) and
`centre-node audit --attack lira`: the attack finds members of a set that holds them, finds nothing in a
set unrelated to the pool, the CLI writes the promised keys, and bad input is one line, exit 2, nothing
written. CPU, tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet
from histodd_fed.privacy.classifier import TrainSpec
from histodd_fed.privacy.lira import balanced_halves, lira_scores, logit_confidence, run_lira
from histodd_fed.release.recipes import recipe_from_set

from conftest import REPO

TINY = TrainSpec(model="convnet", model_kwargs={"width": 16, "depth": 2}, epochs=40, lr=0.05, batch_size=32,
                 augmentation="flip_rotate")


def noise_set(n: int, seed: int, size: int = 16, kind: str = "real") -> PatchSet:
    """Random images with random labels: a model can only memorise them, never generalise."""
    r = np.random.default_rng(seed)
    return PatchSet(images=r.integers(0, 256, (n, size, size, 3), dtype=np.uint8), labels=r.integers(0, 2, n),
                    class_names=["normal", "tumour"], kind=kind)


# ---------------------------------------------------------------------------- pieces
def test_phi_is_the_logit_of_the_true_class_probability():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x, y = torch.rand(10, 3, 4, 4), torch.randint(0, 3, (10,))
    phi = logit_confidence(model, x, y, ("identity", "hflip"))
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1).gather(1, y.view(-1, 1)).squeeze(1).numpy()
        p_flip = torch.softmax(model(x.flip(3)).double(), 1).gather(1, y.view(-1, 1)).squeeze(1).numpy()
    np.testing.assert_allclose(phi[:, 0], np.log(p / (1 - p)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(phi[:, 1], np.log(p_flip / (1 - p_flip)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(phi[:, 0], phi[:, 1])      # the flip is a different query


def test_halves_are_balanced_and_random():
    keep = balanced_halves(300, 8, np.random.default_rng(0))
    assert keep.shape == (8, 300) and (keep.sum(0) == 4).all()
    assert 120 < keep[0].sum() < 180                    # each shadow sees about half the pool
    assert len({tuple(c) for c in keep.T}) > 50        # different patches, different halves


@pytest.mark.parametrize("global_variance", [True, False])
def test_scores_follow_the_likelihood_ratio(global_variance):
    """IN values ~ N(mu_p + 2, 1), OUT ~ N(mu_p, 1), with a per-patch offset mu_p no global threshold can
    undo: targets drawn from IN for members, from OUT for non-members -> LiRA separates them."""
    rng = np.random.default_rng(1)
    s, p = 16, 400
    mu = rng.normal(0, 3, (p, 1))
    keep = balanced_halves(p, s, rng)
    shadow = mu[None] + rng.normal(0, 1, (s, p, 1)) + 2.0 * keep[:, :, None]
    member = np.arange(p) < p // 2
    target = mu + rng.normal(0, 1, (p, 1)) + 2.0 * member[:, None]
    online, offline = lira_scores(target, shadow, keep, global_variance)
    from histodd_fed.privacy.membership import auc_from_roc, roc_curve

    auc = auc_from_roc(*roc_curve(online, member)[:2])
    auc_raw = auc_from_roc(*roc_curve(target[:, 0], member)[:2])
    assert auc > 0.85 and auc > auc_raw + 0.1, (auc, auc_raw)
    assert auc_from_roc(*roc_curve(offline, member)[:2]) > 0.8
    # no signal at all -> chance
    flat, _ = lira_scores(mu + rng.normal(0, 1, (p, 1)), mu[None] + rng.normal(0, 1, (s, p, 1)), keep, global_variance)
    assert abs(auc_from_roc(*roc_curve(flat, member)[:2]) - 0.5) < 0.1


def test_privacy_layer_does_not_import_distill():
    code = ("import sys, histodd_fed.privacy.lira; "
            "bad = [m for m in sys.modules if m.startswith('histodd_fed.distill')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# ---------------------------------------------------------------------------- the attack
def test_a_set_that_is_its_members_is_detected():
    """(a) the released set IS the members (the recipe: keep every patch, a coreset of all of them):
    LiRA finds them, better than the global threshold, some at zero false positives."""
    members, non_members = noise_set(64, 1), noise_set(64, 2)
    keep_all = lambda half, seed: half.subset(np.arange(len(half)), kind="coreset")  # noqa: E731
    res = run_lira(members, members, non_members, keep_all, shadows=4, train_spec=TINY, seed=0, progress=False)
    assert res.members == res.non_members == 64 and res.shadows == 4 and res.global_variance
    assert res.auc > 0.85, res.summary()
    assert res.auc > res.baseline["auc"] + 0.05, res.summary()
    assert res.tpr_at_fpr["0.01"] > 0 and set(res.tpr_at_fpr) == {"0.01", "0.001"}
    assert res.target_accuracy["members"] > 0.9 and res.target_accuracy["non_members"] < 0.75
    assert res.shadow_sizes == [int(k.sum()) for k in res.keep] and sum(res.shadow_sizes) == 2 * 128
    # deterministic for a seed
    again = run_lira(members, members, non_members, keep_all, shadows=4, train_spec=TINY, seed=0, progress=False)
    np.testing.assert_allclose(again.scores, res.scores)


def test_the_patches_a_small_coreset_holds_are_caught():
    """Sanity of the issue: a real coreset of the pool - 8 of 64 members - is caught. A model trained on 8
    noise images is confident on look-alikes too, so the model-based scores miss most of them; LiRA on the
    released images themselves (distance to the nearest set image) flags every held member at 1% FPR."""
    from histodd_fed.coreset import build_coreset

    members, non_members = noise_set(64, 1), noise_set(64, 2)
    core = build_coreset(members, method="random", ipc=4, seed=0)
    held = np.asarray(core.meta["source_indices"])
    recipe = recipe_from_set(core)
    res = run_lira(core, members, non_members, recipe, shadows=4, train_spec=TINY, seed=0, progress=False)
    found = res.found_among(held, max_fpr=0.01)
    assert set(found) == {"online", "offline", "global_threshold", "set_online", "set_offline"} and len(held) == 8
    assert found["set_offline"] == 8, found
    assert res.set_offline["tpr_at_fpr"]["0.01"] >= 8 / 64 and "auc" in res.summary()["released_set"]
    # the count is a real threshold: a patch merely near a set image is not found
    far = np.setdiff1d(np.arange(64), held)
    assert res.found_among(far, max_fpr=0.01)["set_offline"] <= 1, res.found_among(far)
    with pytest.raises(InputError, match="member rows"):
        res.found_among(np.array([64]))


def test_a_set_unrelated_to_the_pool_is_at_chance():
    """(b) the released set and every shadow set are noise drawn independently of the pool."""
    members, non_members = noise_set(64, 1), noise_set(64, 2)
    unrelated = lambda half, seed: noise_set(20, 1000 + seed % 1000, kind="synthetic")  # noqa: E731
    res = run_lira(noise_set(20, 99, kind="synthetic"), members, non_members, unrelated, shadows=4, train_spec=TINY,
                   seed=0, progress=False)
    assert np.std(res.scores) > 0
    assert abs(res.auc - 0.5) < 0.15, res.summary()
    assert res.tpr_at_fpr["0.01"] < 0.2


def test_bad_inputs_to_run_lira():
    m = noise_set(8, 1)
    with pytest.raises(InputError, match="at least 2 shadows"):
        run_lira(m, m, m, lambda h, s: h, shadows=1, train_spec=TINY)
    with pytest.raises(InputError, match="px"):
        run_lira(noise_set(4, 3, size=8), m, m, lambda h, s: h, shadows=2, train_spec=TINY)
    with pytest.raises(InputError, match="shadow 0"):
        run_lira(m, m, m, lambda h, s: (_ for _ in ()).throw(InputError("too few")), shadows=2, train_spec=TINY,
                 progress=False)


# ---------------------------------------------------------------------------- resuming
class Interrupted(Exception):
    pass


def _counting(recipe, stop_at: int | None = None):
    """``recipe`` that counts its calls and stops the run (as Ctrl-C would) on call ``stop_at``."""
    calls = []

    def make(half, seed):
        if stop_at is not None and len(calls) == stop_at:
            raise Interrupted()
        calls.append(seed)
        return recipe(half, seed)
    return make, calls


def test_an_interrupted_lira_resumes_and_gives_the_uninterrupted_numbers(tmp_path):
    """Stopped after 2 of 4 shadows, run again: only shadows 2 and 3 are made, and every score equals
    the uninterrupted run's; a third run makes none; another seed (another run) starts afresh; a
    damaged shadow file is re-made, never trusted."""
    members, non_members = noise_set(16, 1), noise_set(16, 2)
    keep_all = lambda half, seed: half.subset(np.arange(len(half)), kind="coreset")  # noqa: E731
    spec = TrainSpec(model="convnet", model_kwargs={"width": 8, "depth": 1}, epochs=3, lr=0.05, batch_size=32)
    kw = dict(shadows=4, train_spec=spec, progress=False, checkpoint_dir=tmp_path / "ck", recipe_id="keep-all")
    whole = run_lira(members, members, non_members, keep_all, shadows=4, train_spec=spec, seed=0, progress=False)
    make, calls = _counting(keep_all, stop_at=2)
    with pytest.raises(Interrupted):
        run_lira(members, members, non_members, make, seed=0, **kw)
    assert len(calls) == 2 and len(list((tmp_path / "ck").glob("*/shadow-*.npz"))) == 2
    make, calls = _counting(keep_all)
    res = run_lira(members, members, non_members, make, seed=0, **kw)
    assert len(calls) == 2 and res.resumed_shadows == 2 and res.summary()["resumed_shadows"] == 2
    np.testing.assert_allclose(res.scores, whole.scores)
    np.testing.assert_allclose(res.set_online["scores"], whole.set_online["scores"])
    assert res.shadow_sizes == whole.shadow_sizes and res.auc == whole.auc
    make, calls = _counting(keep_all)
    again = run_lira(members, members, non_members, make, seed=0, **kw)
    assert calls == [] and again.resumed_shadows == 4 and again.auc == whole.auc
    make, calls = _counting(keep_all)
    run_lira(members, members, non_members, make, seed=1, **kw)
    assert len(calls) == 4 and len(list((tmp_path / "ck").iterdir())) == 2
    run_dir = next(d for d in (tmp_path / "ck").iterdir() if json.loads((d / "run.json").read_text())["set_seeds"]
                   == whole.shadow_seeds)
    (run_dir / "shadow-001.npz").write_bytes(b"not an npz")
    np.savez(run_dir / "shadow-002.npz", phi=np.zeros((3, 3)), prox=np.zeros((3, 3)), size=np.int64(1))
    make, calls = _counting(keep_all)
    fixed = run_lira(members, members, non_members, make, seed=0, **kw)
    assert len(calls) == 2 and fixed.resumed_shadows == 2
    np.testing.assert_allclose(fixed.scores, whole.scores)
    with pytest.raises(InputError, match="recipe_id"):
        run_lira(members, members, non_members, keep_all, seed=0, shadows=2, train_spec=spec, progress=False,
                 checkpoint_dir=tmp_path / "ck2")


def test_shadows_in_worker_processes_give_the_one_process_numbers(tmp_path):
    """--workers 2: the shadows are made in two spawned processes (the recipe rebuilt from a real coreset's
    meta travels to them) and every number equals the one-process run's; each is checkpointed as it
    lands. A recipe that cannot travel to a process is refused with one line."""
    from histodd_fed.coreset import build_coreset

    members, non_members = noise_set(16, 1), noise_set(16, 2)
    core = build_coreset(members, method="random", ipc=2, seed=0)
    recipe = recipe_from_set(core)
    spec = TrainSpec(model="convnet", model_kwargs={"width": 8, "depth": 1}, epochs=3, lr=0.05, batch_size=32)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)           # the workers' thread count: the same float reductions
    try:
        one = run_lira(core, members, non_members, recipe, shadows=4, train_spec=spec, seed=0, progress=False)
    finally:
        torch.set_num_threads(prev)
    two = run_lira(core, members, non_members, recipe, shadows=4, train_spec=spec, seed=0, progress=False,
                   workers=2, checkpoint_dir=tmp_path / "ck")
    np.testing.assert_allclose(two.shadow_phi, one.shadow_phi, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(two.scores, one.scores, rtol=1e-6, atol=1e-6)
    assert two.shadow_sizes == one.shadow_sizes == [4] * 4
    assert len(list((tmp_path / "ck").glob("*/shadow-*.npz"))) == 4
    with pytest.raises(InputError, match="worker process"):
        run_lira(core, members, non_members, lambda half, seed: recipe(half, seed), shadows=2, train_spec=spec,
                 progress=False, workers=2)


# ---------------------------------------------------------------------------- recipes
def test_coreset_recipe_is_the_same_method_with_another_seed():
    from histodd_fed.coreset import build_coreset

    real = noise_set(60, 4)
    core = build_coreset(real, method="random", ipc=5, seed=3)
    recipe = recipe_from_set(core)
    assert (recipe.kind, recipe.method, recipe.config["ipc"]) == ("coreset", "random", 5)
    again = recipe(real, 3)
    assert again.kind == "coreset" and again.meta["source_indices"] == core.meta["source_indices"]
    other = recipe(real, 4)
    assert other.meta["seed"] == 4 and other.meta["source_indices"] != core.meta["source_indices"]
    assert recipe_from_set(core.meta).config == recipe.config          # meta alone is enough


def test_distill_recipe_is_the_recorded_config_with_another_seed():
    from histodd_fed.distill import DistillConfig, distill

    real = noise_set(24, 5)
    cfg = DistillConfig.from_yaml(REPO / "configs" / "distill-tiny.yaml", outer_steps=2, inner_steps=2, seed=7)
    syn = distill(real, cfg, progress=False)
    recipe = recipe_from_set(syn, overrides={"candidates": 1})
    assert recipe.kind == "distill" and recipe.distill_config(11).seed == 11
    assert {**recipe.distill_config(7).to_dict()} == cfg.to_dict()
    shadow = recipe(real, 11)
    assert shadow.images.shape == syn.images.shape and shadow.meta["config"]["seed"] == 11
    assert {k: v for k, v in shadow.meta["config"].items() if k != "seed"} == \
           {k: v for k, v in syn.meta["config"].items() if k != "seed"}


def test_sets_without_a_recipe_are_refused():
    for ps in (noise_set(10, 1), noise_set(10, 1, kind="synthetic"),
               PatchSet(images=np.zeros((2, 8, 8, 3), np.uint8), labels=[0, 1], class_names=["a", "b"],
                        kind="coreset", meta={"method": "herding"})):      # no ipc recorded
        with pytest.raises(InputError, match="records no recipe"):
            recipe_from_set(ps)
    with pytest.raises(InputError, match="seed"):
        recipe_from_set({"method": "random", "ipc": 2}, overrides={"seed": 3})


# ---------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from histodd_fed.coreset import build_coreset

    d = tmp_path_factory.mktemp("lira")
    real, hold = noise_set(60, 1), noise_set(60, 2)
    real.save(d / "real")
    hold.save(d / "hold")
    build_coreset(real, method="random", ipc=6, seed=0).save(d / "core")
    real.save(d / "norecipe")        # a real store: no recipe recorded
    return d


def _cli(monkeypatch, capsys, *args):
    """``centre-node ARGS`` through the real entry point: (exit code, stdout, stderr)."""
    from centre_node.cli import main

    monkeypatch.setattr(sys, "argv", ["centre-node", "-q", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_cli_lira_writes_the_promised_keys(stores, monkeypatch, capsys):
    """(c) the exact command shape, small: audit.json holds lira.{auc, tpr_at_fpr, shadows, members,
    non_members}; lira_roc.png is a PNG."""
    out = stores / "A"
    code, stdout, err = _cli(monkeypatch, capsys, "audit", "--synthetic", stores / "core", "--patches",
                             stores / "real", "--holdout", stores / "hold", "--attack", "lira", "--shadows", 4,
                             "--pool", 60, "--lira-epochs", 10, "--out", out)
    assert code in (0, None), err
    d = json.loads((out / "audit.json").read_text())
    lira = d["lira"]
    assert {"auc", "tpr_at_fpr", "shadows", "members", "non_members"} <= set(lira)
    assert set(lira["tpr_at_fpr"]) == {"0.01", "0.001"}
    assert (lira["shadows"], lira["members"], lira["non_members"]) == (4, 30, 30)
    assert 0 <= lira["auc"] <= 1 and all(0 <= v <= 1 for v in lira["tpr_at_fpr"].values())
    assert lira["recipe"]["kind"] == "coreset" and lira["recipe"]["method"] == "random"
    assert lira["design"]["target_made_from"] == 60 and "mis-specified" in lira["design"]["what_it_means"]
    assert len(lira["per_patch"]["score"]) == 60 and lira["shadow_sizes"] == [12] * 4  # ipc 6 x 2 classes
    assert (out / "lira_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"AUC {lira['auc']:.3f}" in stdout
    # the second observable: the set's own images (the coreset holds 12 of the 30 members verbatim)
    rs = lira["released_set"]
    assert {"auc", "tpr_at_fpr", "offline"} <= set(rs) and f"AUC {rs['auc']:.3f}" in stdout
    assert "LiRA on the set's images" in (out / "audit.md").read_text()


def test_cli_lira_resumes_an_interrupted_audit(stores, tmp_path, monkeypatch, capsys):
    """An audit stopped after 2 of its 4 shadows (the files an interrupted run leaves: the finished shadows,
    no audit.json) run again with the same command resumes: it says how many shadows it took back, and
    audit.json equals the one an uninterrupted --no-resume run writes (which keeps no shadows)."""
    base = ["audit", "--synthetic", stores / "core", "--patches", stores / "real", "--holdout", stores / "hold",
            "--attack", "lira", "--shadows", 4, "--pool", 60, "--lira-epochs", 3]
    code, stdout, err = _cli(monkeypatch, capsys, *base, "--no-resume", "--out", tmp_path / "B")
    assert code in (0, None), err
    assert "resumed" not in stdout and not (tmp_path / "B" / "lira-shadows").exists()
    whole = json.loads((tmp_path / "B" / "audit.json").read_text())["lira"]
    out = tmp_path / "A"
    code, stdout, err = _cli(monkeypatch, capsys, *base, "--out", out)
    assert code in (0, None), err
    assert "resumed" not in stdout
    shadows = sorted(out.glob("lira-shadows/*/shadow-*.npz"))
    assert [p.name for p in shadows] == [f"shadow-{k:03d}.npz" for k in range(4)]
    for p in shadows[2:] + [out / "audit.json"]:
        p.unlink()
    code, stdout, err = _cli(monkeypatch, capsys, *base, "--out", out)
    assert code in (0, None), err
    assert "2 of 4 shadows resumed" in stdout
    resumed = json.loads((out / "audit.json").read_text())["lira"]
    assert resumed["resumed_shadows"] == 2 and whole["resumed_shadows"] == 0
    for key in ("auc", "tpr_at_fpr", "offline", "released_set", "shadow_sizes", "per_patch"):
        assert resumed[key] == whole[key], key


def test_cli_default_attack_is_unchanged(stores, monkeypatch, capsys):
    out = stores / "T"
    code, _, err = _cli(monkeypatch, capsys, "audit", "--synthetic", stores / "core", "--patches", stores / "real",
                        "--no-membership", "--out", out)
    assert code in (0, None), err
    d = json.loads((out / "audit.json").read_text())
    assert "lira" not in d and "summary" in d and not (out / "lira_roc.png").exists()


def test_cli_attack_all_adds_lira_to_the_full_audit(stores, monkeypatch, capsys):
    out = stores / "ALL"
    code, stdout, err = _cli(monkeypatch, capsys, "audit", "--synthetic", stores / "core", "--patches",
                             stores / "real", "--holdout", stores / "hold", "--attack", "all", "--shadows", 2,
                             "--pool", 60, "--lira-epochs", 5, "--out", out)
    assert code in (0, None), err
    d = json.loads((out / "audit.json").read_text())
    assert "summary" in d and "membership" in d                       # the threshold audit is all there
    assert d["lira"]["shadows"] == 2 and d["files"]["lira_roc"] == "lira_roc.png"
    assert (out / "lira_roc.png").is_file() and "## LiRA" in (out / "audit.md").read_text()
    assert "LiRA (2 shadows" in stdout


@pytest.mark.parametrize("case", ["no-holdout", "no-recipe", "bad-attack", "one-shadow"])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(stores, monkeypatch, capsys, case):
    """(d) no --holdout, a set without a recipe, ...: one line on stderr, exit 2, no output folder."""
    out = stores / f"bad-{case}"
    syn = stores / ("norecipe" if case == "no-recipe" else "core")
    args = ["audit", "--synthetic", syn, "--patches", stores / "real", "--attack",
            "bogus" if case == "bad-attack" else "lira", "--out", out]
    if case != "no-holdout":
        args += ["--holdout", stores / "hold"]
    if case == "one-shadow":
        args += ["--shadows", 1]
    code, _, err = _cli(monkeypatch, capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    expect = {"no-holdout": "--holdout", "no-recipe": "records no recipe", "bad-attack": "--attack",
              "one-shadow": "--shadows"}[case]
    assert expect in lines[0]
    assert not out.exists()


def test_cli_lira_on_real_pcam_applies_the_sets_view(shared_data, tmp_path, monkeypatch, capsys):
    """Real 96-px PCam patches, a random coreset made in the pcam view (centre 32 px): the pool is cropped
    the same way before the shadows are made and the models trained."""
    from histodd_fed.coreset import build_coreset
    from histodd_fed.patchset import load_image_folder
    from histodd_fed.preprocess import ViewSpec, apply_view

    pcam = shared_data / "pcam-ai4all"
    if not (pcam / "train").is_dir():
        pytest.skip(f"{pcam}/train absent")
    real = load_image_folder(pcam / "train", limit_per_class=30, seed=0)
    hold = load_image_folder(pcam / "valid", limit_per_class=30, seed=0)
    assert real.image_size == 96
    real.save(tmp_path / "real")
    hold.save(tmp_path / "hold")
    build_coreset(apply_view(real, ViewSpec.centre_crop(96, 32)), method="random", ipc=4, seed=0).save(tmp_path / "core")
    code, _, err = _cli(monkeypatch, capsys, "audit", "--synthetic", tmp_path / "core", "--patches", tmp_path / "real",
                        "--holdout", tmp_path / "hold", "--attack", "lira", "--shadows", 2, "--pool", 40,
                        "--lira-epochs", 5, "--out", tmp_path / "A")
    assert code in (0, None), err
    lira = json.loads((tmp_path / "A" / "audit.json").read_text())["lira"]
    assert lira["pool"]["view"] == ViewSpec.centre_crop(96, 32).to_dict()
    assert lira["members"] == lira["non_members"] == 20 and lira["shadow_sizes"] == [8, 8]
