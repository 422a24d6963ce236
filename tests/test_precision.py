"""TrainConfig.precision = "bf16": the conv networks under bf16 autocast, everything else float32."""
import dataclasses
import json
import math

import pytest
import torch

import argparse

from sta.cli import _add_train_arguments, _train_config
from sta.train import ConfigError, preset, train


def _tiny(**changes):
    config = preset("tiny")
    return dataclasses.replace(config, steps=3, log_every=1, **changes)


def test_bf16_training_runs_networks_in_bf16_and_the_elbo_in_float32(tmp_path, one_thread, monkeypatch):
    seen = {}
    original = torch.nn.Conv2d.forward

    def spy(self, x):
        out = original(self, x)
        seen.setdefault(out.dtype, 0)
        seen[out.dtype] += 1
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    model = train(_tiny(precision="bf16"), out=str(tmp_path), progress=False)
    assert seen.get(torch.bfloat16, 0) > 0, seen  # the conv networks ran in bf16
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(r["nelbo"]) for r in records)
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    x = torch.rand(2, model.config.transitions + 1, model.config.channels, model.config.image_size,
                   model.config.image_size)
    model.network_dtype = torch.bfloat16
    terms = model.elbo(x, temperature=0.5)
    assert terms.loss.dtype == torch.float32 and terms.recon.dtype == torch.float32


def test_precision_is_validated_and_reachable_from_the_cli():
    with pytest.raises(ConfigError, match="precision"):
        _tiny(precision="fp8").validate()
    parser = argparse.ArgumentParser()
    _add_train_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--precision", "bf16"])
    assert _train_config(args).precision == "bf16"
