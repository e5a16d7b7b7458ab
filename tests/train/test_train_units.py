"""Small pieces of the trainer: batch layout + log-probs, config layers, reference policy, checkpoints."""

import json

import pytest
import torch

from rpg_train import checkpoint
from rpg_train.config import PRESETS, Config, build_config, config_from_dict, parse_override
from rpg_train.logprobs import IGNORE_INDEX, build_batch, sequence_logprobs
from rpg_train.metrics import MetricsLog, plot_metrics, read_metrics, summarize
from rpg_train.reference import ReferencePolicy
from tests.support import tiny_causal_lm

VOCAB = 61


def tiny_model(seed: int = 0):
    return tiny_causal_lm("qwen2", seed=seed, vocab_size=VOCAB)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_logprobs_match_unpadded_full_forward(seed):
    """Right padding, the K scored columns and micro-batch trimming give each sequence's own log-probs."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_model(seed)
    lengths = [
        (int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(0, 9, (1,), generator=gen)))
        for _ in range(7)
    ]
    lengths[0] = (1, 3)  # a one-token prompt
    prompts = [torch.randint(0, VOCAB, (p,), generator=gen).tolist() for p, _ in lengths]
    completions = [torch.randint(0, VOCAB, (c,), generator=gen).tolist() for _, c in lengths]
    batch = build_batch(prompts, completions, pad_id=0)
    assert batch.mask.sum() == sum(c for _, c in lengths)
    logprobs, entropy = sequence_logprobs(model, batch, micro_batch=3, backend="torch")
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        got = logprobs[i][batch.mask[i] > 0]
        assert got.numel() == len(completion)
        assert torch.equal(batch.targets[i][batch.mask[i] > 0], torch.tensor(completion, dtype=torch.long))
        if not completion:
            continue
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0].double(), -1)
        expected = full[len(prompt) - 1 : -1].gather(1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
        ent = -(full.exp() * full).sum(-1)[len(prompt) - 1 : -1]
        torch.testing.assert_close(entropy[i][batch.mask[i] > 0].double(), ent, rtol=1e-4, atol=1e-5)
    assert (logprobs[batch.mask == 0] == 0).all() and (batch.targets[batch.mask == 0] == IGNORE_INDEX).all()


def test_build_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="prompt_ids"):
        build_batch([[1], [2]], [[3]], pad_id=0)
    with pytest.raises(ValueError, match="prompt"):
        build_batch([[]], [[3]], pad_id=0)


def test_config_layers_yaml_roundtrip_and_errors(tmp_path):
    cfg = build_config(
        "tiny", overrides=["optim.lr=1e-4", "algo.loss_overrides={kl: fkl}", "train.progress=no"]
    )
    assert cfg.optim.lr == 1e-4 and cfg.algo.loss_overrides == {"kl": "fkl"} and cfg.train.progress is False
    assert cfg.rollout.group_size == PRESETS["tiny"]["rollout"]["group_size"]
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    again = build_config(config_file=path)
    assert again == cfg
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}
    # paper preset: the defaults of the RPG paper's runs
    paper = build_config("rpg", overrides=["model.path=/m", "data.train_file=/d.parquet"])
    assert (paper.optim.lr, paper.optim.weight_decay, paper.optim.grad_clip, paper.optim.warmup_steps) == (
        1e-6,
        0.1,
        1.0,
        10,
    )
    assert (paper.rollout.group_size, paper.train.prompts_per_step, paper.train.mini_batch_prompts) == (
        16,
        512,
        32,
    )
    assert paper.algo.loss_overrides["beta"] == 1e-4 and paper.rollout.max_tokens == 4096
    for bad, match in [
        ("optim.lrr=1", "optim.lrr"),
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "integer"),
        ("rollout=3", "rollout"),
        ("nokey", "section.key=value"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_config("tiny", overrides=[bad])
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("nope")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        build_config(config_file=tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="data.train_file"):
        build_config("rpg", overrides=["model.path=/m"])
    with pytest.raises(ValueError, match="mini_batch_prompts"):
        build_config("tiny", overrides=["train.prompts_per_step=10", "train.mini_batch_prompts=4"])
    assert isinstance(Config(), Config)


def test_reference_policy_refresh_rules():
    policy = torch.nn.Linear(3, 2)
    assert ReferencePolicy(policy).is_old_policy
    every = ReferencePolicy(policy, "every_k", every_k=2)
    with torch.no_grad():
        policy.weight.add_(1.0)
    assert not every.after_optimizer_step(policy, 0.0)
    assert not torch.equal(every.model.weight, policy.weight)
    assert every.after_optimizer_step(policy, 0.0)
    assert torch.equal(every.model.weight, policy.weight) and every.updates == 1
    threshold = ReferencePolicy(policy, "kl_threshold", kl_threshold=0.1, kl_ema=0.5)
    assert not threshold.after_optimizer_step(policy, 0.1)  # average 0.1, not above
    assert threshold.after_optimizer_step(policy, 0.3)  # average 0.2
    fixed = ReferencePolicy(policy, "never")
    assert not any(fixed.after_optimizer_step(policy, 100.0) for _ in range(5))
    restored = ReferencePolicy(policy, "every_k", every_k=2)
    restored.load_state_dict(every.state_dict())
    assert torch.equal(restored.model.weight, every.model.weight)
    with pytest.raises(ValueError, match="ref_update"):
        ReferencePolicy(policy, "sometimes")


def test_checkpoints_atomic_listing_and_pruning(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, step, {"x": torch.full((2,), float(step))}, keep=2)
    (checkpoint.checkpoint_dir(tmp_path) / ".step-00000004.pt.tmp-123").write_bytes(b"torn")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000002.pt", "step-00000003.pt"]
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path))
    assert state["step"] == 3 and torch.equal(state["x"], torch.full((2,), 3.0))
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        checkpoint.load_checkpoint(tmp_path / "nothing.pt")


def test_metrics_log_resume_plot_and_summary(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 11):
        log.log({"step": step, "reward": step / 10, "kl": torch.tensor(0.01 * step)})
    log.log({"step": 10, "eval_accuracy": 0.5})
    MetricsLog(tmp_path, resume_step=6)  # a resume from step 6 drops steps 7..10
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    summary = summarize([{"step": s, "reward": s / 10} for s in range(1, 21)])
    assert summary["reward_first"] == pytest.approx(0.15) and summary["reward_last"] == pytest.approx(1.95)
    assert plot_metrics(records, tmp_path / "m.png").stat().st_size > 1000


def test_missing_model_or_data_path_names_the_field(tmp_path):
    from rpg_train.train import train

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1 max 2 =", "answer": "2"}\n')
    for overrides, field in [
        ([f"model.path={tmp_path / 'no-model'}", f"data.train_file={data}"], "model.path"),
        ([f"model.path={tmp_path}", f"data.train_file={tmp_path / 'no.jsonl'}"], "data.train_file"),
        (
            [
                f"model.path={tmp_path}",
                f"data.train_file={data}",
                f"data.eval_file={tmp_path / 'no-eval.jsonl'}",
            ],
            "data.eval_file",
        ),
    ]:
        cfg = build_config(
            "rpg", overrides=[*overrides, f"train.out_dir={tmp_path / 'run'}", "train.device=cpu"]
        )
        with pytest.raises(FileNotFoundError, match=rf"{field}: path does not exist: .*no"):
            train(cfg)


def test_dynamic_sampling_drops_all_equal_groups_and_refills():
    from types import SimpleNamespace

    from rpg_train.train import PromptSampler, collect_rollouts

    class ScriptedEngine:
        """Prompt k's completions are "k" or "x": answer "k" gives reward 1, so mixed groups have spread."""

        def generate(self, prompt_token_ids, n, max_tokens, temperature, seed):
            out = []
            for ids in prompt_token_ids:
                k = ids[0]
                texts = [str(k)] * n if k % 3 == 0 else ["x"] * n if k % 3 == 1 else [str(k), "x"] * (n // 2)
                out.append([SimpleNamespace(token_ids=[7], text=t) for t in texts])
            return out

    def reward_fn(texts, answers, *, lengths, max_len):
        return [float(t == a) for t, a in zip(texts, answers)]

    prompts = [SimpleNamespace(token_ids=[k], answer=str(k)) for k in range(30)]
    cfg = build_config(
        "tiny",
        overrides=[
            "rollout.group_size=4",
            "algo.dynamic_sampling=true",
            "algo.dynamic_sampling_max_tries=20",
        ],
    )
    sampler = PromptSampler(prompts, seed=0, rank=0)
    rollouts, stats = collect_rollouts(ScriptedEngine(), sampler, reward_fn, cfg, num_groups=4, seed=0)
    groups = rollouts.rewards.view(4, 4)
    assert (groups.max(1).values > groups.min(1).values).all()  # only groups with a reward spread
    assert stats["dynamic_sampling_kept"] == 1.0 and sampler.position > 4  # it had to refill
    cfg.algo.dynamic_sampling_max_tries = 0  # no refill: all-equal groups fill the gap, and the stat says so
    rollouts, stats = collect_rollouts(
        ScriptedEngine(), PromptSampler(prompts, 0, 0), reward_fn, cfg, 6, seed=0
    )
    assert len(rollouts.rewards) == 24 and stats["dynamic_sampling_kept"] < 1.0
    cfg.algo.dynamic_sampling = False
    rollouts, stats = collect_rollouts(
        ScriptedEngine(), PromptSampler(prompts, 0, 0), reward_fn, cfg, 6, seed=0
    )
    assert len(rollouts.rewards) == 24 and stats == {}
