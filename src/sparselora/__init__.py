"""SparseLoRA: faster LoRA fine-tuning through contextual sparsity on the frozen main branch."""

from sparselora.config import (  # noqa: E402
    ConfigError,
    SparseLoRAConfig,
    get_preset,  # noqa: E402
)
from sparselora.engine.estimator import (  # noqa: E402
    Estimator,
    EstimatorCache,
    EstimatorFileError,
    EstimatorMismatchError,
)
from sparselora.engine.handle import SparseLoRA, apply_sparselora  # noqa: E402
from sparselora.engine.schedule import SparseLoRACallback, SparseSchedule  # noqa: E402
from sparselora.presets import PRESETS  # noqa: E402
from sparselora.version import __version__  # noqa: F401

__all__ = [
    "ConfigError",
    "Estimator",
    "EstimatorCache",
    "EstimatorFileError",
    "EstimatorMismatchError",
    "PRESETS",
    "SparseLoRA",
    "SparseLoRACallback",
    "SparseLoRAConfig",
    "SparseSchedule",
    "apply_sparselora",
    "get_preset",
]
