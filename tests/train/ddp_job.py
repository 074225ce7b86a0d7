"""A 2-process distillation job for ``test_distributed.py``, launched with torchrun.

Usage: ``torchrun --nproc_per_node 2 ddp_job.py OUT_DIR [STOP_AT_STEP]``. Each rank writes its final
weights to ``OUT_DIR/rank{r}.pt``; with ``STOP_AT_STEP`` the run dies at that step (after the first
epoch's checkpoint), as an interrupted job would.
"""

import sys
from pathlib import Path


def main(out: Path, stop_at: int | None) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from slimkit.distill import FeatureKD
    from slimkit.train import fit

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)).eval()
    student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(9):  # odd on purpose: one batch per epoch is left out so both ranks take 4 steps
        x = torch.randn(32, 16, generator=g)
        data.append((x, teacher(x).argmax(-1)))
    kd = FeatureKD(student, teacher, {"1": "1"}, example_inputs=data[0][0])  # adapter 8 -> 32 wide

    def after_step(step: int, total: int) -> None:
        if stop_at is not None and step == stop_at:
            raise SystemExit(3)

    fit(student, data, epochs=3, lr=0.05, teacher=teacher, extra_loss=kd, after_step=after_step,
        checkpoint=out / "ckpt.pt")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"student": student.state_dict(), "adapters": kd.adapters.state_dict()}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
