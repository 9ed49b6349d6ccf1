"""TrainConfig: the reference recipe's defaults (docs/method.md "Training recipe"), YAML round trip, clear errors."""

import pytest

from dreamrelation_core.training.config import TrainConfig


def test_defaults_are_reference_recipe():
    c = TrainConfig()
    assert (c.rank, c.alpha, c.dropout) == (16, 16.0, 0.0)
    assert (c.learning_rate, c.weight_decay, c.warmup_steps, c.num_steps) == (2e-4, 0.01, 200, 3000)
    assert (c.mask_weight, c.rcl_weight, c.rcl_temperature) == (50.0, 0.01, 0.07)
    assert (c.positive_bank_size, c.negative_bank_size, c.positives_per_anchor, c.negatives) == (10, 64, 4, 10)
    assert (c.caption_dropout, c.checkpoint_every, c.batch_size, c.grad_clip) == (0.1, 200, 1, 0.0)


def test_yaml_round_trip(tmp_path):
    c = TrainConfig(rank=8, alpha=4.0, num_steps=10, adam_betas=(0.8, 0.9), extra={"tiny": {"num_layers": 3}})
    path = c.save_yaml(tmp_path / "cfg.yaml")
    assert TrainConfig.load_yaml(path) == c


def test_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 4\nlerning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown option\(s\) \['lerning_rate'\]"):
        TrainConfig.load_yaml(bad)
    bad.write_text("rank: 0\n")
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        TrainConfig.load_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        TrainConfig.load_yaml(bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        TrainConfig.load_yaml(tmp_path / "missing.yaml")
