"""`python -m rpg_train`: a configuration error is one line on stderr and exit status 2 (argparse's way)."""

import pytest

from rpg_train import checkpoint
from rpg_train.__main__ import main


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--set", "optim.lr=-1"], "optim.lr must be > 0"),
        (["--set", "algo.loss=ppo"], "algo.loss must be one of"),
        (["--set", "optim.betas=0.9"], "optim.betas must be a list of 2 numbers"),
        (["--set", "algo.loss_overrides={kl: fkl"], "not valid YAML"),
        (["--config", "missing.yaml"], "config file not found: missing.yaml"),
    ],
)
def test_a_config_error_is_one_line_and_exit_2(argv, field, capsys):
    # issue 16, finding 6: every config error arrived as a traceback
    assert main(["--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m rpg_train: error: ") and field in err, err


def test_a_folder_with_another_runs_checkpoints_is_refused_in_one_line(tmp_path, capsys):
    (checkpoint.checkpoint_dir(tmp_path) / "step-00000006").mkdir(parents=True)
    assert main(["--preset", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "step-00000006" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert main(["--preset", "tiny", "--out", str(tmp_path), "--resume", "--overwrite"]) == 2
