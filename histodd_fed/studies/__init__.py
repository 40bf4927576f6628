"""The paper's patch-level studies: methods x ipc (Table 1), augmentation ablation (Table 2),
cross-architecture (Table 3), accuracy vs ipc (Figure 1b), patch grid (Figure 1a).

Each writes ``results.md``, ``results.csv``, ``results.json``, PNG plots and ``run_config.json``
into its output folder.
"""

from histodd_fed.studies.ablation_study import run_ablation_study
from histodd_fed.studies.context import StudyRun, load_study_data
from histodd_fed.studies.cross_arch_study import run_cross_arch_study
from histodd_fed.studies.figures import patch_grid
from histodd_fed.studies.methods_study import run_coreset_study, run_ipc_study
from histodd_fed.studies.presets import EvalSettings, StudyPreset, load_preset

__all__ = ["EvalSettings", "StudyPreset", "StudyRun", "load_preset", "load_study_data", "patch_grid",
           "run_ablation_study", "run_coreset_study", "run_cross_arch_study", "run_ipc_study"]
