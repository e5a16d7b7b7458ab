"""`rpg_train.checkpoint`: atomic writes, listing and pruning."""

import pytest
import torch

from rpg_train import checkpoint


def test_checkpoints_atomic_listing_and_pruning(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, step, {"x": torch.full((2,), float(step))}, keep=2)
    (checkpoint.checkpoint_dir(tmp_path) / ".step-00000004.pt.tmp-123").write_bytes(b"torn")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000002.pt", "step-00000003.pt"]
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path))
    assert state["step"] == 3 and torch.equal(state["x"], torch.full((2,), 3.0))
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        checkpoint.load_checkpoint(tmp_path / "nothing.pt")
