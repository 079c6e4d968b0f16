"""Tasks for OmniNet trials: ListOps (LRA), byte-level LM, masked bytes, associative recall,
multi-query associative recall (MQAR), copy, Parquet, and text in a pretrained model's own
vocabulary (``text_lm``, ``masked_text``: its ``tokenizer.json``).

Build one from a plain dict: ``build_task({"name": "listops", "preset": "quickstart"})``.
The interface (splits, padded batches, shifted lm labels, metrics) is documented in
``omninet.tasks.base``; each task's module documents its data and token layout.
"""

from omninet.tasks.base import (IGNORE_INDEX, SPLITS, TASKS, ClassificationMeter, GeneratedTask, LMMeter, Task,
                                TaskConfig, TaskSplit, TokenMeter, UnitMeter, build_task, register_task)
from omninet.tasks.byte_lm import ByteLMConfig, ByteLMTask
from omninet.tasks.listops import (LISTOPS_PRESETS, LISTOPS_TOKENS, ListOpsConfig, ListOpsTask, evaluate_listops,
                                   generate_listops)
from omninet.tasks.masked_bytes import MaskedBytesConfig, MaskedBytesTask
from omninet.tasks.mqar import MQARConfig, MQARTask
from omninet.tasks.parquet import ParquetConfig, ParquetTask
from omninet.tasks.synthetic import AssociativeRecallConfig, AssociativeRecallTask, CopyConfig, CopyTask
from omninet.tasks.text import MaskedTextConfig, MaskedTextTask, TextLMConfig, TextLMTask, TextTokenizer
from omninet.tasks.tokenizer import (BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, MASK_ID, MASKED_VOCAB_SIZE, NUM_SPECIAL, PAD_ID,
                                     SEP_ID, ByteTokenizer)

__all__ = [
    "IGNORE_INDEX", "SPLITS", "TASKS", "Task", "TaskConfig", "TaskSplit", "GeneratedTask", "ClassificationMeter",
    "LMMeter", "UnitMeter", "build_task", "register_task",
    "ListOpsConfig", "ListOpsTask", "LISTOPS_PRESETS", "LISTOPS_TOKENS", "evaluate_listops", "generate_listops",
    "ByteLMConfig", "ByteLMTask", "MaskedBytesConfig", "MaskedBytesTask", "AssociativeRecallConfig",
    "AssociativeRecallTask", "MQARConfig", "MQARTask", "CopyConfig", "CopyTask", "ParquetConfig", "ParquetTask",
    "TextLMConfig", "TextLMTask", "MaskedTextConfig", "MaskedTextTask", "TextTokenizer", "TokenMeter",
    "ByteTokenizer", "BYTE_VOCAB_SIZE", "MASKED_VOCAB_SIZE", "PAD_ID", "BOS_ID", "EOS_ID", "SEP_ID", "MASK_ID",
    "NUM_SPECIAL",
]
