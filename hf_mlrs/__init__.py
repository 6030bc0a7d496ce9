"""hf_mlrs: learned, transferable learning-rate schedules (MLR-SNet) for Hugging Face training."""

__version__ = "0.1.0"

from .callback import MLRSCallback  # noqa: E402
from .checkpoints import last_complete_checkpoint  # noqa: E402
from .config import MLRSTrainingArguments  # noqa: E402
from .modeling import MLRSNet  # noqa: E402
from .multitask import MLRSMultiTaskTrainer  # noqa: E402
from .scheduler import MLRSScheduler  # noqa: E402
from .trainer import MLRSTrainer  # noqa: E402


__all__ = [
    "MLRSCallback",
    "MLRSMultiTaskTrainer",
    "MLRSNet",
    "MLRSScheduler",
    "MLRSTrainer",
    "MLRSTrainingArguments",
    "last_complete_checkpoint",
    "__version__",
]
