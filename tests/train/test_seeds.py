"""`rpg_train.seeds`: one function derives every seed; RNG states round-trip."""

import random

import numpy as np
import pytest
import torch

from rpg_train.seeds import derive_seed, rng_state, seed_everything, set_rng_state


def test_derived_seeds_are_stable_distinct_and_in_range():
    assert derive_seed(0, "rollout", 3, 1) == derive_seed(0, "rollout", 3, 1)
    seeds = {
        derive_seed(s, p, step, rank)
        for s in (0, 1)
        for p in ("rollout", "eval")
        for step in range(50)
        for rank in range(4)
    }
    assert len(seeds) == 2 * 2 * 50 * 4 and all(0 <= s < 2**31 for s in seeds)
    with pytest.raises(TypeError, match="seed"):
        derive_seed(1.5, "rollout")


def test_rng_state_round_trip():
    seed_everything(7)
    state = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first


def test_derived_seeds_do_not_depend_on_the_process(tmp_path):
    """Python's ``hash`` of a str is salted per process; the derived seeds must not be."""
    import subprocess
    import sys

    code = "from rpg_train.seeds import derive_seed; print(derive_seed(3, 'prompts', 2, 1))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": h, **_env()}
        ).stdout.strip()
        for h in ("1", "2")
    }
    assert outputs == {str(derive_seed(3, "prompts", 2, 1))}


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
