"""JobSettings (a job's one settings object) and the process settings of grokhpc.runtime."""

from __future__ import annotations

import pytest

from grokhpc.config import ConfigError
from grokhpc.runtime import DEFAULT_STATE_EVERY_S, JobSettings, torch_threads


def test_job_settings_defaults_and_what_an_attempt_records():
    s = JobSettings()
    assert (s.state_every_s, s.step_mode, s.threads, s.wandb) == (600.0, "eager", None, None)
    assert DEFAULT_STATE_EVERY_S == 600.0   # ten minutes, as the launcher's state_every says
    rec = JobSettings(state_every_s=0, step_mode="fused", wandb={"project": "p"}).provenance()
    assert rec == {"state_every_s": 0, "step_mode": "fused", "wandb": True}


@pytest.mark.parametrize("field, value, words", [
    ("state_every_s", -1, "state_every_s: expected seconds >= 0, got -1"),
    ("state_every_s", float("inf"), "state_every_s: expected seconds >= 0, got inf"),
    ("state_every_s", True, "state_every_s: expected seconds >= 0, got True"),
    ("step_mode", "fast", "step_mode: expected one of eager, fused, graph, compile, got 'fast'"),
    ("threads", 0, "threads: expected an integer >= 1, got 0"),
    ("threads", 1.5, "threads: expected an integer >= 1, got 1.5"),
])
def test_job_settings_refuse_impossible_values_in_one_line(field, value, words):
    with pytest.raises(ConfigError) as e:
        JobSettings(**{field: value})
    assert str(e.value) == f"job settings: {words}"


def test_torch_threads_are_set_for_the_block_and_restored():
    import torch

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
