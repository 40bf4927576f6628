"""``DistillConfig``: every knob of a Histo-DD distillation run, loadable from YAML."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from histodd_fed.errors import ConfigError

DISTANCES = ("l1", "l1_mean", "cosine", "mse")
INITS = ("real", "noise", "herding", "mixture", "mosaic", "public")
UPDATES = ("joint", "per_class")
DSA_MODES = ("all", "single")
LR_SCHEDULES = ("constant", "cosine")
#: Coreset options an ``init: herding`` run may set in ``init_coreset`` (histodd_fed.coreset.CoresetConfig).
INIT_CORESET_KEYS = ("arch", "arch_kwargs", "feature_epochs", "lr", "batch_size")
MATCHING = ("fast", "reference")
INPUT_NORMS = ("none", "imagenet", "dataset")
#: Fields that do not change the result (left out of the resume / checkpoint key).
NON_RESULT_FIELDS = ("device", "checkpoint_every")
#: Fields added after result keys were first published: left out of the key while at their default,
#: so the caches and checkpoints of earlier runs stay valid.
LATER_FIELDS = {"init_mix": 16, "init_grid": 2, "init_colour_pool": 0, "init_anchor": "random", "objective": "gradient", "update": "joint", "dsa_mode": "all", "lr_schedule": "constant",
                "privacy_step": 0.0, "privacy_corr_percentile": 90.0, "privacy_l2_percentile": 10.0,
                "privacy_topk": 4, "dp_noise": 0.0, "dp_clip": 1.0, "dp_delta": 1e-5,
                "formation": 1, "candidates": 1, "candidate_holdout": 500, "candidate_epochs": 200,
                "candidate_eval_seeds": 2, "candidate_augmentation": "flip_rotate", "dm_layers": "last",
                "dm_moments": 1, "candidate_gate": False, "dp_epsilon": 0.0, "dp_nets": 8, "dp_augs": 4, "dp_pool": 0,
                "public_dir": "", "public_scale": 4, "public_pick": "project",
                "input_norm": "none", "match_fc": True, "lr_img_ref_size": 0, "lr_img_size_power": 2.0,
                "lr_img_ipc_power": 1.0}


@dataclass
class DistillConfig:
    """Histo-DD hyper-parameters (Algorithm 1 of Cong et al.), with paper-like defaults."""

    # networks
    model: str = "resnetap10"                     #: distillation network (convnet | resnetap10)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 64                          #: patches are resized to this many pixels
    # synthetic set
    ipc: int = 10                                 #: m: synthetic images per class (per slide if per_slide)
    init: str = "real"                            #: real (the paper's) | noise | herding | mixture (extra options)
    #: init mixture: each synthetic image starts as the mean of this many random real images of its class
    #: (no single patient's patch is the starting point; the gate's distance rules start far away)
    init_mix: int = 16
    #: init mosaic: each synthetic image starts as a ``init_grid`` x ``init_grid`` mosaic, tile (i, j) cut
    #: from the same place of a different random real patch of its class (real texture at the right
    #: scale, but no real patch's layout)
    init_grid: int = 2
    #: init mixture / mosaic: draw each image's sources among the this-many nearest patches (by colour
    #: statistics) of a random anchor patch of the class, so an image mixes one stain (0: any patches)
    init_colour_pool: int = 0
    #: how the anchors of a colour-pooled init are chosen: random patches, or the patches nearest to the
    #: k-means centres (k = ipc) of the class's colour statistics (one image per colour cluster)
    init_anchor: str = "random"
    #: init herding: CoresetConfig options of the herding feature net (keys INIT_CORESET_KEYS); unset
    #: arch/arch_kwargs default to ``model``/``model_kwargs``. Ignored (and left out of result keys) otherwise.
    init_coreset: dict[str, Any] = field(default_factory=dict)
    per_slide: bool = False                       #: m per class for every slide (for MIL)
    #: per-slide mode: a (slide, class) group with fewer real patches than this (a tumour slide holding 2
    #: tumour patches) borrows that class's patches from other slides with the same slide label (then any
    #: other slide) up to this many, for its mixture starts and its matching: its images then never start
    #: from, or match, a mixture of a few patches. 0: a group keeps only its own patches.
    slide_group_min: int = 8
    #: multi-formation factor f (IDC, Kim et al. 2022; histodd_fed.formation): each stored image is an
    #: f x f grid of (image_size / f)-px tiles, decoded into f**2 training images - same bytes, f**2 x the
    #: images (distribution matching only; 1: off)
    formation: int = 1
    # outer / inner loops
    outer_steps: int = 200                        #: K
    inner_steps: int = 100                        #: U
    slide_outer_steps: int | None = None          #: K per slide in per-slide mode (None: outer_steps)
    lr_img: float = 0.5                           #: synthetic-image learning rate (5e-3 for large patches)
    lr_schedule: str = "constant"                 #: constant | cosine (decay to 0 over the outer steps)
    #: 0: ``lr_img`` is the step size as given. N > 0: ``lr_img`` is calibrated for N-px images and 10 ipc,
    #: and the run uses ``lr_img * (image_size / N) ** lr_img_size_power * (ipc / 10) ** lr_img_ipc_power``
    #: (:meth:`effective_lr_img`): a pixel's gradient shrinks with the pixels and the images per class. The
    #: IDC / Acc-DD code the paper builds on scales by powers 2 and 1 (``tune_lr_img``); measured on PCam
    #: with the paper's network the gradient falls as size^-3 and ipc^-1.5 (docs/distillation.md "Paper preset")
    lr_img_ref_size: int = 0
    lr_img_size_power: float = 2.0
    lr_img_ipc_power: float = 1.0
    #: joint: one image step per inner step on the sum of the class losses; per_class: one step per class
    #: per inner step (Algorithm 1 of the paper, as DC/DSA)
    update: str = "joint"
    momentum_img: float = 0.5
    batch_real: int = 128                         #: real images per class per matching step
    distance: str = "l1"                          #: l1 (summed) | l1_mean (per-layer mean) | cosine (DC) | mse
    #: match the gradient of the final fully-connected (classifier) weights too. false: conv weights only,
    #: as the IDC / Acc-DD code Histo-DD builds on (``--fc False``, its default; DC/DSA match the classifier
    #: with their per-row cosine). Biases and norm parameters are never matched (both codes skip 1-D ones).
    match_fc: bool = True
    #: input normalisation of the distillation networks, applied inside the model to real and synthetic
    #: images alike (after the augmentation, so the stain op still sees RGB in [0, 1]): none | imagenet
    #: (fixed ImageNet mean / std) | dataset (per-channel mean / std of the real patches given to the run,
    #: as DC / DSA / IDC normalise by the data set's statistics). Gradient matching only.
    input_norm: str = "none"
    # model pool and model augmentation
    pool_size: int = 5                            #: |S|: pre-trained models
    pool_epochs: int = 5
    pool_lr: float = 0.01
    pool_batch: int = 128
    alpha: float = 0.01                           #: model-augmentation strength (per-filter norm ratio)
    # model updates inside the inner loop (on real data)
    net_steps: int = 1
    lr_net: float = 0.01
    batch_net: int = 128
    # augmentation (DSA strategy string, see histodd_fed.augment)
    augmentation: str = "color_crop_cutout_flip_scale_rotate_stain"
    #: all: every op of the strategy at every matching step; single: one op drawn per step (DSA's 'S' mode)
    dsa_mode: str = "all"
    #: gradient: Histo-DD's gradient matching; distribution: distribution matching (DM, Zhao & Bilen 2023,
    #: as FedWSIDD uses): per class, the mean ``features`` embedding of a real batch vs of the synthetic
    #: images under the same siamese augmentation, squared L2, on the pool's (typically untrained) networks
    objective: str = "gradient"
    #: distribution matching only: which embeddings are matched - ``last`` (DM: the ``features`` output) or
    #: ``all`` (the output of every block of a ``body`` Sequential network, each flattened, as layer-wise
    #: alignment in CAFE / DataDAM), and ``dm_moments`` 1 (means, DM) or 2 (means and second moments)
    dm_layers: str = "last"
    dm_moments: int = 1
    # privacy term (extra, not the paper's): after every image step, synthetic images whose nearest real
    # patches are closer than the real-real nearest-neighbour percentiles below (structure correlation of
    # low-passed grey images above its p``privacy_corr_percentile``, or normalised L2 below its
    # p``privacy_l2_percentile``) are pushed away from their ``privacy_topk`` nearest real patches by a
    # step of ``privacy_step`` RMS per pixel (0: off)
    privacy_step: float = 0.0
    privacy_corr_percentile: float = 90.0
    privacy_l2_percentile: float = 10.0
    privacy_topk: int = 4
    # differentially private matching (histodd_fed.distill.dp; extra, after Private Set Generation):
    # per-example clipping to ``dp_clip`` and Gaussian noise of ``dp_noise`` x clip on every real-batch
    # gradient, Poisson-sampled real batches; epsilon at ``dp_delta`` from Opacus's RDP accountant (0: off)
    dp_noise: float = 0.0
    dp_clip: float = 1.0
    dp_delta: float = 1e-5
    # DP distribution matching (dm-dp, histodd_fed.distill.dm_dp): one-shot DP class-mean embeddings. Target
    # (epsilon, ``dp_delta``) (0: off); every real patch's embedding under ``dp_nets`` fixed random networks
    # (averaged over ``dp_augs`` augmentations), clipped to ``dp_clip``, summed per class with a count
    # coordinate, one Gaussian noise draw calibrated by Opacus's PRV accountant; the synthetic images
    # (``init`` noise | public) are then matched to the noisy means (post-processing)
    dp_epsilon: float = 0.0
    dp_nets: int = 8
    dp_augs: int = 4
    #: dm-dp embedding: 0 the flattened block outputs (as the recipe's DM); p > 0 each block's output
    #: average-pooled to p x p (1: per-block channel means; far fewer coordinates for the noise)
    dp_pool: int = 0
    #: PUBLIC images (never the centre's patches) for ``init: public`` and for centring the embeddings:
    #: a folder of image files (e.g. the Camelyon17 stain tiles), each downscaled by ``public_scale`` and
    #: cut into ``image_size`` patches; ``public_pick`` project: per class the public patches whose
    #: embedding lies furthest toward the class's noisy mean (post-processing), random: random patches
    public_dir: str = ""
    public_scale: int = 4
    public_pick: str = "project"
    #: fast: one augmentation call for all classes, class-stacked gradients (torch.func vmap on GPU, a
    #: class loop on CPU), no second-order network gradients; same random draws as ``reference`` (the
    #: plain per-class loop), equal to float rounding. Batch-norm networks always use ``reference``.
    matching: str = "fast"
    # best of K (histodd_fed.distill.select): distil ``candidates`` sets (seeds seed*1000+k) from all but
    # ``candidate_holdout`` patches per class, train a fresh ``model`` on each (``candidate_epochs``,
    # ``candidate_augmentation``, ``candidate_eval_seeds`` seeds), keep the best on the held-out patches
    candidates: int = 1
    candidate_holdout: int = 500
    candidate_epochs: int = 200
    candidate_eval_seeds: int = 2
    candidate_augmentation: str = "flip_rotate"
    #: best of K: keep the best candidate that passes the export gate (histodd_fed.privacy.gate, shipped
    #: configs/privacy.yaml) audited against all the patches it was distilled from; candidates are audited
    #: in order of held-out accuracy until one passes (none passes: the best is kept, with a warning)
    candidate_gate: bool = False
    # run
    seed: int = 0
    device: str = "auto"                          #: auto | cpu | cuda | cuda:N
    checkpoint_every: int = 10                    #: outer steps between checkpoints (0: never)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"distill config: {name} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

        for n in ("image_size", "ipc", "outer_steps", "inner_steps", "lr_img", "batch_real", "pool_size",
                  "pool_lr", "pool_batch", "batch_net", "lr_net"):
            positive(n)
        for n in ("init_mix", "init_grid", "privacy_topk", "formation", "candidates", "candidate_holdout",
                  "candidate_epochs", "candidate_eval_seeds"):
            positive(n)
        for n in ("pool_epochs", "alpha", "net_steps", "checkpoint_every", "momentum_img", "privacy_step",
                  "init_colour_pool"):
            positive(n, allow_zero=True)
        if not isinstance(self.slide_group_min, int) or isinstance(self.slide_group_min, bool) or self.slide_group_min < 0:
            raise ConfigError(f"distill config: slide_group_min must be an integer >= 0, got {self.slide_group_min!r}")
        if self.slide_outer_steps is not None:
            positive("slide_outer_steps")
        for n in ("lr_img_ref_size", "lr_img_size_power", "lr_img_ipc_power"):
            positive(n, allow_zero=True)
        if not isinstance(self.match_fc, bool):
            raise ConfigError(f"distill config: match_fc must be true or false, got {self.match_fc!r}")
        if self.input_norm not in INPUT_NORMS:
            raise ConfigError(f"distill config: input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if self.input_norm != "none" and (self.objective != "gradient" or self.dp_epsilon):
            raise ConfigError(f"distill config: input_norm {self.input_norm!r} is implemented for gradient matching "
                              f"(objective: gradient), not {self.objective!r}" + (" with dp_epsilon" if self.dp_epsilon else ""))
        if self.distance not in DISTANCES:
            raise ConfigError(f"distill config: distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.matching not in MATCHING:
            raise ConfigError(f"distill config: matching must be one of {MATCHING}, got {self.matching!r}")
        if self.init not in INITS:
            raise ConfigError(f"distill config: init must be one of {INITS}, got {self.init!r}")
        from histodd_fed.distill.objectives import config_objectives   # the registered objectives

        for name, allowed in (("update", UPDATES), ("dsa_mode", DSA_MODES), ("lr_schedule", LR_SCHEDULES),
                              ("objective", config_objectives()), ("init_anchor", ("random", "kmeans")),
                              ("dm_layers", ("last", "all")), ("dm_moments", (1, 2))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"distill config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("privacy_corr_percentile", "privacy_l2_percentile"):
            if not 0 <= float(getattr(self, name)) <= 100:
                raise ConfigError(f"distill config: {name} must be in [0, 100], got {getattr(self, name)!r}")
        if self.dp_noise < 0 or self.dp_clip <= 0 or not 0 < self.dp_delta < 1:
            raise ConfigError(f"distill config: need dp_noise >= 0, dp_clip > 0, 0 < dp_delta < 1 (got {self.dp_noise}, "
                              f"{self.dp_clip}, {self.dp_delta})")
        if self.objective != "distribution" and (self.dm_layers != "last" or self.dm_moments != 1):
            raise ConfigError("distill config: dm_layers / dm_moments apply to distribution matching only "
                              "(objective: distribution)")
        if self.objective == "distribution" and self.dp_noise > 0:
            raise ConfigError("distill config: DP is implemented for gradient matching only (objective: gradient)")
        if self.formation != 1:
            if not isinstance(self.formation, int) or isinstance(self.formation, bool) or self.image_size % self.formation:
                raise ConfigError(f"distill config: formation {self.formation!r} must be an int dividing image_size "
                                  f"{self.image_size}")
            why = [f"objective {self.objective!r} (needs distribution)" if self.objective != "distribution" else "",
                   "privacy_step" if self.privacy_step else "", "per_slide" if self.per_slide else "",
                   f"init {self.init!r}" if self.init == "herding" else ""]
            why = [w for w in why if w]
            if why:
                raise ConfigError("distill config: multi-formation (formation > 1) is implemented for distribution "
                                  "matching without the privacy term, per-slide sets or herding init; not with: "
                                  + "; ".join(why))
        if self.candidates > 1:
            if self.per_slide:
                raise ConfigError("distill config: best-of-K selection (candidates > 1) is for patch-level sets, "
                                  "not per_slide")
            if self.dp_noise > 0:
                raise ConfigError("distill config: best-of-K selection reads held-out real patches; it would void "
                                  "the DP guarantee (dp_noise > 0): set candidates: 1")
            from histodd_fed.augment import parse_strategy as _parse

            _parse(self.candidate_augmentation)
        if not isinstance(self.candidate_gate, bool):
            raise ConfigError(f"distill config: candidate_gate must be true or false, got {self.candidate_gate!r}")
        if self.dp_noise > 0:
            from histodd_fed.augment import build_augmentation

            leaks = [f"init {self.init!r} (needs noise)" if self.init != "noise" else "",
                     f"pool_epochs {self.pool_epochs} (pool networks must not train on real patches: 0)"
                     if self.pool_epochs else "",
                     "per_slide" if self.per_slide else "",
                     f"augmentation {self.augmentation!r} estimates a stain template from real patches"
                     if build_augmentation(self.augmentation).uses_stains else "",
                     "privacy_step (reads real patches)" if self.privacy_step else ""]
            leaks = [x for x in leaks if x]
            if leaks:
                raise ConfigError("distill config: DP matching (dp_noise > 0) lets real patches in only through the "
                                  "noised gradients; these settings would leak them: " + "; ".join(leaks))
        if self.dp_epsilon:
            from histodd_fed.distill.dm_dp import validate_dm_dp

            validate_dm_dp(self)
        elif self.init == "public":
            raise ConfigError("distill config: init 'public' is for DP distribution matching (dp_epsilon > 0)")
        if not isinstance(self.init_coreset, dict):
            raise ConfigError(f"distill config: init_coreset must be a mapping, got {self.init_coreset!r}")
        bad = sorted(set(self.init_coreset) - set(INIT_CORESET_KEYS))
        if bad:
            raise ConfigError(f"distill config: unknown init_coreset option(s) {bad}; known: {INIT_CORESET_KEYS}")
        if self.init == "herding" and self.per_slide:
            raise ConfigError("distill config: init herding is for patch-level runs only (per_slide is set)")
        from histodd_fed.augment import parse_strategy

        parse_strategy(self.augmentation)

    def effective_lr_img(self) -> float:
        """The image step size the run uses: ``lr_img``, scaled by the resolution / ipc rule when
        ``lr_img_ref_size`` is set (see the field)."""
        if not self.lr_img_ref_size:
            return float(self.lr_img)
        return (float(self.lr_img) * (self.image_size / self.lr_img_ref_size) ** float(self.lr_img_size_power)
                * (self.ipc / 10.0) ** float(self.lr_img_ipc_power))

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cache_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without ``slide_group_min`` at patch level (it is read only per slide), so the
        federation's cache keys of patch-level sets stay those of earlier runs."""
        d = self.to_dict()
        if not self.per_slide:
            d.pop("slide_group_min", None)
        return d

    def result_dict(self) -> dict[str, Any]:
        """The fields that determine the result (used for resume and cache keys)."""
        d = self.cache_dict()
        for k in NON_RESULT_FIELDS:
            d.pop(k, None)
        if self.init != "herding":  # keeps the keys of real / noise runs as they were before init_coreset
            d.pop("init_coreset", None)
        for k, default in LATER_FIELDS.items():
            if d.get(k) == default:
                d.pop(k)
        if self.init != "mixture":
            d.pop("init_mix", None)
        if self.init != "mosaic":
            d.pop("init_grid", None)
        return d

    def herding_coreset_config(self):
        """The ``CoresetConfig`` that picks the initial images of an ``init: herding`` run."""
        from histodd_fed.coreset import CoresetConfig

        opts = {"arch": self.model, "arch_kwargs": dict(self.model_kwargs), **self.init_coreset}
        return CoresetConfig(method="herding", ipc=self.ipc, seed=self.seed, device=self.device, **opts)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config", **overrides: Any) -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        merged = dict(data or {})
        merged.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown distill option(s) {unknown}")
        try:
            return cls(**merged)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "DistillConfig":
        """Load ``path`` (a mapping of field names; an optional top-level ``distill:`` key) + overrides.

        A preset file's ``distill_by_ipc`` entry for the run's ipc (``overrides``' ipc, else the file's) is
        applied over its ``distill:`` section, as :meth:`histodd_fed.preset.Preset.distill_config` does: every
        caller gets the preset's recipe for that ipc. Overrides that are ``None`` are ignored, so CLI options can be
        passed straight through; the others win.
        """
        from histodd_fed.runconfig import read_yaml_mapping

        path = Path(path)
        data = read_yaml_mapping(path, "distill options")
        if "distill_by_ipc" in data:  # a preset file: its own loader merges the ipc's entry
            from histodd_fed.preset import load_preset

            return load_preset(path).distill_config(**overrides)
        if "distill" in data and isinstance(data["distill"], dict):
            data = data["distill"]
        return cls.from_dict(data, where=str(path), **overrides)
