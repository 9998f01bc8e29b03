"""The README's code runs as written (on a tiny UNITER), and its commands exist."""

import re
from pathlib import Path

import torch

from tests.test_models import make_batch, tiny_config
from villa_fast.models import build_model

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_adversarial_step_example_runs_and_trains():
    (code,) = [b for b in _python_blocks() if "VillaStep(" in b]
    torch.manual_seed(0)
    cfg = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = build_model("vqa", cfg, num_answer=5)
    batches = []
    for seed in range(3):
        b = make_batch(cfg, [5, 3], [4, 2], seed=seed)
        b["targets"] = torch.rand(2, 5)
        batches.append(b)
    before = [p.detach().clone() for p in model.parameters()]
    env = {
        "model": model,
        "task_loss": model.loss,
        "loader": batches,
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
    }
    exec(compile(code, str(README), "exec"), env)
    result = env["result"]
    assert torch.isfinite(result.loss) and set(result.deltas) == {"text", "image"}
    assert int(result.skipped) == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_make_targets_exist():
    text = README.read_text()
    makefile = (README.parent / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", text, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README shows `make {target}`"
