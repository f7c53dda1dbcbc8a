"""Training tasks: each pairs a model family with its batches and loss. `TASKS` maps
`task.name` in the config to the class."""

from lmflax.tasks.base import Task
from lmflax.tasks.classification import SequenceClassification
from lmflax.tasks.instruct import InstructionTuning
from lmflax.tasks.lm import CausalLM, MaskedLM
from lmflax.tasks.qa import QuestionAnswering
from lmflax.tasks.seq2seq import Seq2Seq
from lmflax.tasks.tagging import TokenClassification
from lmflax.tasks.word2vec import Word2VecTask

TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (
        CausalLM,
        InstructionTuning,
        MaskedLM,
        SequenceClassification,
        TokenClassification,
        QuestionAnswering,
        Seq2Seq,
        Word2VecTask,
    )
}


def make_task(cfg) -> Task:
    """Instantiates the task the config names."""
    return TASKS[cfg.task.name](cfg)


__all__ = [
    "TASKS",
    "CausalLM",
    "InstructionTuning",
    "MaskedLM",
    "QuestionAnswering",
    "Seq2Seq",
    "SequenceClassification",
    "Task",
    "TokenClassification",
    "Word2VecTask",
    "make_task",
]
