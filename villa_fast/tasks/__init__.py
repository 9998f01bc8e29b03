"""Per-task glue for the trainer: which dataset, collate, model, loss, metrics and prediction file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from villa_fast.tasks.base import EXAMPLES, TOKENS, DataContext, Task, load_model_config

__all__ = ["EXAMPLES", "TOKENS", "DataContext", "Task", "build_task", "load_model_config"]


def build_task(cfg: Mapping[str, Any]) -> Task:
    """The :class:`Task` named by ``cfg["task"]``."""
    from villa_fast.train.config import ConfigError

    name = cfg.get("task")
    if name == "vqa":
        from villa_fast.tasks.vqa import VqaTask as cls
    elif name == "ve":
        from villa_fast.tasks.vqa import VeTask as cls
    elif name == "nlvr2":
        from villa_fast.tasks.nlvr2 import Nlvr2Task as cls
    elif name == "vcr":
        from villa_fast.tasks.vcr import VcrTask as cls
    elif name == "retrieval":
        from villa_fast.tasks.retrieval import RetrievalTask as cls
    elif name == "re":
        from villa_fast.tasks.re import ReTask as cls
    elif name == "pretrain":
        from villa_fast.tasks.pretrain import PretrainTask as cls
    elif name is None:
        raise ConfigError(
            "config key 'task' is not set and the config file name does not name one: "
            "pass --task (vqa, ve, nlvr2, vcr, retrieval, re, pretrain)"
        )
    else:
        raise ConfigError(
            f"config key 'task' is {name!r}, not a task: use one of vqa, ve, nlvr2, vcr, retrieval, re, pretrain "
            "(resolve_config also maps the authors' names, e.g. itm to retrieval)"
        )
    return cls(cfg)
