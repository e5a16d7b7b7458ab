"""`rpg_train.outdir`: a run never touches another run's files (issue 16, finding 1)."""

import pytest

from rpg_train import checkpoint
from rpg_train.config import ConfigError
from rpg_train.metrics import read_metrics
from rpg_train.outdir import OutDirInUse
from tests.train.runs import tiny_config


@pytest.mark.timeout(300)
def test_a_new_run_is_refused_a_folder_with_checkpoints_and_overwrite_replaces_the_old_run(tmp_path):
    from rpg_train.train import train

    # the longer run: checkpoints 2 and 3 (keep 2), three metrics lines, a summary naming step 3
    keep = ["train.checkpoint_every=1", "train.keep_checkpoints=2"]
    train(tiny_config(tmp_path, *keep, steps=3))
    old = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert old == ["step-00000002", "step-00000003"]

    # a second run into the same folder (a GPU preset after another: the same default runs/rpg) used to
    # prune its own checkpoints as it wrote them and leave a summary and a --resume pointing at the old run
    with pytest.raises(OutDirInUse, match=r"step-00000003.*--resume.*--out DIR.*--overwrite"):
        train(tiny_config(tmp_path, *keep, steps=2))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == old  # untouched
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    with pytest.raises(ConfigError, match="give one of them"):
        train(tiny_config(tmp_path, steps=2), resume=True, overwrite=True)

    summary = train(tiny_config(tmp_path, *keep, steps=2), overwrite=True)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert summary["checkpoint"] == str(checkpoint.checkpoint_dir(tmp_path) / "step-00000002")
    assert summary["steps"] == 2 and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
