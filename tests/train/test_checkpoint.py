"""`rpg_train.checkpoint`: DCP checkpoints, commit, listing (torn ones never picked), pruning, round trip."""

import pytest
import torch

from rpg_train import checkpoint
from tests.support import tiny_causal_lm


def trained(seed: int = 0):
    """A tiny LM and its AdamW after one step (so that the optimizer has states)."""
    model = tiny_causal_lm("qwen2", tie_word_embeddings=True, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[1, 2, 3, 4]])).logits.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def save(out, step, model, optimizer, keep=2, reference=None):
    return checkpoint.save_checkpoint(
        out,
        step,
        model=model,
        optimizer=optimizer,
        reference=reference,
        trainer_state={"note": f"step {step}"},
        rank_state={"data_position": 10 * step},
        keep=keep,
    )


def test_listing_pruning_and_torn_checkpoints(tmp_path):
    model, optimizer = trained()
    for step in (1, 2, 3):
        save(tmp_path, step, model, optimizer, keep=2)
    folder = checkpoint.checkpoint_dir(tmp_path)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert not (folder / "step-00000001").exists()
    # an interrupted write (the temporary folder), a folder without its manifest, a truncated file
    (folder / ".step-00000004.tmp").mkdir()
    (folder / "step-00000005").mkdir()
    (folder / "step-00000005" / "trainer.pt").write_bytes(b"torn")
    shard = folder / "step-00000003" / "__0_0.distcp"
    assert checkpoint.is_complete(shard.parent)
    shard.write_bytes(shard.read_bytes()[:-1])
    assert not checkpoint.is_complete(shard.parent)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000002"
    state = checkpoint.read_trainer_state(checkpoint.latest_checkpoint(tmp_path))
    assert (state["step"], state["note"], state["ranks"]) == (2, "step 2", [{"data_position": 20}])
    with pytest.raises(FileNotFoundError, match="step-00000003"):
        checkpoint.read_trainer_state(shard.parent)
    # the same step saved again replaces the torn folder
    save(tmp_path, 3, model, optimizer, keep=0)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000003"


def test_round_trip_is_bit_identical_and_exports_weights(tmp_path):
    model, optimizer = trained(seed=0)
    path = save(tmp_path, 7, model, optimizer, reference=tiny_causal_lm("qwen2", seed=5))
    fresh, fresh_optimizer = trained(seed=1)
    assert not torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    reference = tiny_causal_lm("qwen2", seed=6)
    state = checkpoint.load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, reference=reference)
    assert state["step"] == 7 and state["has_reference"]
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in ("exp_avg", "exp_avg_sq", "step"))
    assert torch.equal(reference.lm_head.weight, tiny_causal_lm("qwen2", seed=5).lm_head.weight)
    with pytest.raises(ValueError, match="ref_update"):
        checkpoint.load_checkpoint(path, model=fresh, optimizer=fresh_optimizer)
    plain = tiny_causal_lm("qwen2", tie_word_embeddings=True, seed=2)
    checkpoint.load_model_weights(path, plain)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_rotation_prunes_only_this_runs_past(tmp_path):
    # issue 16, finding 1: rotation kept the newest `keep` by step across the folder, so a checkpoint of a
    # later step (another run's, or one a resume fell back from) made each new checkpoint prune itself
    model, optimizer = trained()
    for step in (1, 2, 6):
        save(tmp_path, step, model, optimizer, keep=0)
    save(tmp_path, 3, model, optimizer, keep=2)
    save(tmp_path, 4, model, optimizer, keep=2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-00000003", "step-00000004", "step-00000006"]


def test_partial_temporaries_are_cleaned_and_unreadable_checkpoints_named(tmp_path):
    model, optimizer = trained()
    path = save(tmp_path, 1, model, optimizer)
    folder = checkpoint.checkpoint_dir(tmp_path)
    for name in (".step-00000002.tmp", ".step-00000001.deleting"):  # what a kill leaves
        (folder / name).mkdir()
        (folder / name / "__0_0.distcp").write_bytes(b"x" * 100)
    removed = checkpoint.clean_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".step-00000001.deleting", ".step-00000002.tmp"]
    assert [p.name for p in folder.iterdir()] == ["step-00000001"]
    # zeroed blocks of the right size (a crash on some file systems): complete, but it does not load
    metadata = path / ".metadata"
    metadata.write_bytes(bytes(metadata.stat().st_size))
    assert checkpoint.is_complete(path)
    with pytest.raises(checkpoint.UnreadableCheckpoint, match=r"step-00000001: the weights do not load"):
        checkpoint.load_checkpoint(path, model=model, optimizer=optimizer)
    trainer = path / "trainer.pt"
    trainer.write_bytes(bytes(trainer.stat().st_size))
    with pytest.raises(checkpoint.UnreadableCheckpoint, match=r"step-00000001/trainer.pt: does not load"):
        checkpoint.read_trainer_state(path)
