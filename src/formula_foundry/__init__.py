"""formula-foundry: reproducible experiment tracking for HPC clusters.

Compute nodes log through :mod:`formula_foundry.tracking` into lock-free spool files;
``ff-sync`` (:mod:`formula_foundry.sync`) replays them idempotently into MLflow;
:mod:`formula_foundry.substrate` holds manifests, run directories and the artifact store.
"""

__version__ = "0.1.0"
