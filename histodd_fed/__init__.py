"""histodd-fed: Histo-DD dataset distillation, sealed bundles and cross-centre transfer."""

__version__ = "0.1.0"
