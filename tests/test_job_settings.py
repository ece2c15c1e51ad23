"""A job's settings are checked before anything trains: a bad step mode (the job's own, or
$GROKHPC_STEP_MODE) or a bad W&B mapping fails the job in one line, with no run directory
touched, instead of the runs training one by one with the error only in the log."""

import pytest

from conftest import TINY_RUN
from grokhpc import job as job_mod
from grokhpc.config import ConfigError, RunConfig, to_dict
from grokhpc.runtime import JobSettings


def _runs(tmp_path):
    cfgs = [RunConfig(**{**TINY_RUN, "n_epochs": 20, "model_seed": s}) for s in (1, 2)]
    return [(to_dict(c), str(tmp_path / f"r{s}")) for s, c in zip((1, 2), cfgs)]


def _unchecked(**values) -> JobSettings:
    """Settings as an unpickled job carries them: never validated (pickle skips __init__)."""
    s = JobSettings()
    for k, v in values.items():
        object.__setattr__(s, k, v)
    return s


@pytest.mark.parametrize("values,message", [
    ({"step_mode": "fast"}, "the job's settings: step_mode: expected one of eager, fused, graph, "
                            "compile, got 'fast'"),
    ({"threads": 0}, "the job's settings: threads: expected an integer >= 1, got 0"),
    ({"wandb": {"project": "p", "mode": "sometimes"}},
     "the job's settings: wandb.mode: expected offline | online, got 'sometimes'"),
])
def test_a_bad_job_setting_fails_the_job_in_one_line_before_training(tmp_path, values, message):
    runs = _runs(tmp_path)
    said = []
    with pytest.raises(ConfigError) as e:
        job_mod.SweepJob(runs, _unchecked(**values))()
    assert str(e.value) == message
    with pytest.raises(ConfigError):
        job_mod.train_runs(runs, _unchecked(**values), log=said.append)
    assert said == [] and not any(tmp_path.iterdir())


def test_a_bad_step_mode_in_the_environment_fails_the_job_before_training(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("GROKHPC_STEP_MODE", "grpah")
    said = []
    with pytest.raises(ConfigError) as e:
        job_mod.train_runs(_runs(tmp_path), JobSettings(), log=said.append)
    assert str(e.value) == ("$GROKHPC_STEP_MODE: expected one of eager, fused, graph, compile, "
                            "got 'grpah'")
    assert said == [] and not any(tmp_path.iterdir())
    assert "\n" not in str(e.value)
