"""The strategies' registry, settings and placements (``txtrain.parallel.specs``): one schema
per strategy, refusing the settings of another; placements that the planner and the running
strategies share, read from the config alone; and none of it loading torch."""

import subprocess
import sys
from math import prod
from pathlib import Path

import pytest

from conftest import call_txtrain, make_config
from txtrain.parallel import STRATEGIES, strategy_class
from txtrain.parallel.specs import FSDPConfig, PipelineConfig, sharding_strategy

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "parallel"
UNTIED = {"pipeline": ["model.tie_embeddings=false"]}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_each_strategy_composes_its_own_schema_and_class(name):
    cfg = make_config(f"parallel={name}", *UNTIED.get(name, []))
    assert type(cfg.parallel) is STRATEGIES[name].settings and cfg.parallel.name == name
    assert strategy_class(name).name == name


def test_every_strategy_has_a_config_file_and_every_file_a_strategy():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(STRATEGIES)


@pytest.mark.parametrize("overrides, fragment", [
    (["parallel=ddp", "parallel.replicate=2"], "parallel.replicate"),
    (["parallel=ddp", "+parallel.replicate=2"], "unknown key 'parallel.replicate'"),
    (["parallel=fsdp", "parallel.schedule=gpipe"], "parallel.schedule"),
    (["parallel=none", "parallel.name=fsdp"], "choose the strategy with parallel=fsdp"),
    (["parallel.name=zero"], "parallel.name=zero is not one of none, dp"),
])
def test_the_settings_of_another_strategy_are_refused_in_one_line(overrides, fragment):
    outcome = call_txtrain(*overrides, "plan=true")
    lines = outcome.stderr.strip().splitlines()
    assert outcome.status == 2 and len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    assert fragment in lines[0]


def test_the_settings_and_the_registry_load_no_torch():
    """The command line checks the config before torch loads."""
    code = ("import sys; from txtrain.config import register_configs; register_configs(); "
            "import txtrain.parallel; assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("world, replicate", [(1, 1), (2, 1), (4, 1), (4, 2), (3, 1)])
def test_fsdp_shards_add_up_to_each_parameter_once_per_replica(world, replicate):
    placement = FSDPConfig(replicate=replicate).placement(world)
    for shape in [(15, 64), (7,), (), (2, 3, 4), (1, 5)]:
        held = [placement.numel_held(shape, rank) for rank in range(world)]
        assert sum(held) == replicate * prod(shape), shape


@pytest.mark.parametrize("world, per_rank, n_blocks", [(2, 1, 4), (2, 2, 4), (3, 1, 7), (2, 2, 5), (4, 1, 4)])
def test_pipeline_stages_hold_every_block_once_in_order(world, per_rank, n_blocks):
    cfg = PipelineConfig(schedule="interleaved" if per_rank > 1 else "1f1b", stages_per_rank=per_rank)
    placement = cfg.placement(world)
    names = [str(i) for i in range(n_blocks)]
    held = [placement.blocks(rank, names) for rank in range(world)]
    assert sorted(sum(held, []), key=int) == names
    assert all(blocks == sorted(blocks, key=int) for blocks in held)  # each rank's, in model order
    assert [placement.holds_embeddings(rank) for rank in range(world)] == [True] + [False] * (world - 1)
    assert [placement.holds_head(rank) for rank in range(world)].count(True) == 1
    last_stage = placement.stage_blocks(names)[-1]
    assert set(last_stage) <= set(held[placement.last_rank])


def test_the_planner_suggests_the_strategy_that_shards_parameters():
    sharded = sharding_strategy()
    assert STRATEGIES[sharded.name].placement.shards_parameters
    assert sharded == STRATEGIES[sharded.name].settings(name=sharded.name)  # at its defaults
