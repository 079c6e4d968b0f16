"""Tasks for OmniNet trials: ListOps (LRA), byte-level LM, associative recall, copy, Parquet.

Build one from a plain dict: ``build_task({"name": "listops", "preset": "quickstart"})``.
The interface (splits, padded batches, shifted lm labels, metrics) is documented in
``omninet.tasks.base``; each task's module documents its data and token layout.
"""

from omninet.tasks.base import (IGNORE_INDEX, SPLITS, TASKS, ClassificationMeter, GeneratedTask, LMMeter, Task,
                                TaskConfig, TaskSplit, build_task, register_task)
from omninet.tasks.byte_lm import ByteLMConfig, ByteLMTask
from omninet.tasks.listops import (LISTOPS_PRESETS, LISTOPS_TOKENS, ListOpsConfig, ListOpsTask, evaluate_listops,
                                   generate_listops)
from omninet.tasks.parquet import ParquetConfig, ParquetTask
from omninet.tasks.synthetic import AssociativeRecallConfig, AssociativeRecallTask, CopyConfig, CopyTask
from omninet.tasks.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, NUM_SPECIAL, PAD_ID, SEP_ID, ByteTokenizer

__all__ = [
    "IGNORE_INDEX", "SPLITS", "TASKS", "Task", "TaskConfig", "TaskSplit", "GeneratedTask", "ClassificationMeter",
    "LMMeter", "build_task", "register_task",
    "ListOpsConfig", "ListOpsTask", "LISTOPS_PRESETS", "LISTOPS_TOKENS", "evaluate_listops", "generate_listops",
    "ByteLMConfig", "ByteLMTask", "AssociativeRecallConfig", "AssociativeRecallTask", "CopyConfig", "CopyTask",
    "ParquetConfig", "ParquetTask",
    "ByteTokenizer", "BYTE_VOCAB_SIZE", "PAD_ID", "BOS_ID", "EOS_ID", "SEP_ID", "NUM_SPECIAL",
]
