"""Pre-training validation of region classification: which classes the accuracy compares (UNITER's
``validate_mrc``: classes 1.. for MRC, every class for MRC-kl)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from villa_fast.tasks.pretrain import PretrainTask

# rows: (prediction logits, soft target) over 3 classes, class 0 the background
LOGITS = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0], [5.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
TARGETS = torch.tensor([[0.6, 0.1, 0.3], [0.6, 0.1, 0.3], [0.1, 0.3, 0.6], [0.2, 0.7, 0.1]])


def _accuracy(task: str) -> float:
    pt = PretrainTask({})
    state = pt.eval_init()
    for lo, hi in ((0, 3), (3, 4)):  # two batches
        pt.eval_batch(state, None, LOGITS[lo:hi], {"task": task, "label_targets": TARGETS[lo:hi]})
    return pt.eval_finish(state)[f"{task}_acc"]


def test_mrckl_accuracy_takes_the_argmax_over_every_class():
    # validate_mrc, "kl" in task: argmax of log_softmax(prediction) against argmax of the soft target, all classes
    want = (F.log_softmax(LOGITS, -1).argmax(-1) == TARGETS.argmax(-1)).float().mean().item()
    assert want == 0.75
    assert _accuracy("mrckl") == want


def test_mrc_accuracy_leaves_the_background_out():
    # validate_mrc otherwise: argmax over classes 1.. of both
    want = (LOGITS[:, 1:].argmax(-1) == TARGETS[:, 1:].argmax(-1)).float().mean().item()
    assert want == 0.5
    assert _accuracy("mrc") == want
