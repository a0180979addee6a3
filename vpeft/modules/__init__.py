"""Lightning tasks (``FewShotClassifier``, ``ClipPromptTask``, ``ZeroShotEvaluator``, ``TrainingFreeClassifier``,
``SamSegmenter``, ``PointCloudClassifier``), their callbacks and the ``vpeft`` LightningCLI. Needs Lightning.

Importing this package lets jsonargparse (and so LightningCLI) parse ``vpeft.PeftConfig`` subclasses from
``class_path``/``init_args``: method configs are dataclasses, which jsonargparse otherwise treats as final.
"""

from jsonargparse import set_parsing_settings

import vpeft

# Dataclasses are parsed as plain groups unless subclassing is enabled for their base; every registered method
# config (also third-party ones) subclasses PeftConfig.
set_parsing_settings(subclasses_enabled=[vpeft.PeftConfig])

from .base import PeftTask, method_configs  # noqa: E402
from .callbacks import AdapterCheckpoint, AtomicCheckpointIO, ResultCard  # noqa: E402
from .classification import FewShotClassifier  # noqa: E402
from .clip_tasks import ClipPromptTask, ZeroShotEvaluator  # noqa: E402
from .pointcloud import PointCloudClassifier  # noqa: E402
from .segmentation import SamSegmenter  # noqa: E402
from .training_free import TrainingFreeClassifier  # noqa: E402

__all__ = ["AdapterCheckpoint", "AtomicCheckpointIO", "ClipPromptTask", "FewShotClassifier", "PeftTask", "ResultCard",
           "PointCloudClassifier", "SamSegmenter", "TrainingFreeClassifier", "ZeroShotEvaluator", "method_configs"]
