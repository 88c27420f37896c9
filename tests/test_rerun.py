"""Running the command of a finished run again trains nothing and changes nothing."""

import json

from conftest import make_config
from txtrain.train import Trainer

RUN = ["train.steps=4", "train.log_every=1", "train.eval_every=0", "task.n_eval=20",
       "model.n_layer=1", "model.n_embd=32"]


def test_the_same_command_after_a_run_finished_keeps_its_record(tmp_path):
    first = Trainer(make_config(*RUN), tmp_path).fit()
    files = {name: (tmp_path / name).read_bytes() for name in ("run.json", "metrics.jsonl", "eval.jsonl")}
    again = Trainer(make_config(*RUN), tmp_path).fit()
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    recorded = json.loads(files["run.json"])
    assert again == recorded["result"] and recorded["result"]["tokens_per_s"] > 0
    assert "startup_s" in recorded and again["loss"] == first["loss"]
