"""Every mistake a user can make on the command line or in the data gets one `error:` line and
exit status 2, and leaves an existing run dir exactly as it was.

Each case runs in this process (``call_txtrain``) against a copy of a finished run, so a
refused command that wrote anything into the run dir (Hydra's config copy, a log line, a
checkpoint) would show. A property test then throws random override strings at the command
line: none may end in a traceback.
"""

import hashlib
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import call_txtrain

# The finished run each case is pointed at (one layer 32 wide, two steps).
RUN = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.steps=2", "train.eval_every=0"]
TEXT = ["task=text", "task.tokenizer=char", "task.cache_dir={data}/cache"]

CASES = {
    # composing the config
    "unknown group option": (["model=nope"], "Could not find 'model/nope'"),
    "unknown key": (["model.n_layerz=3"], "n_layerz"),
    "unknown key, added": (["+model.widht=3"], "unknown key 'model.widht'"),
    "wrong type": (["train.steps=lots"], "train.steps"),
    "not a bool": (["progress=maybe"], "not a valid bool"),
    "not one of the choices": (["model.pos=absolute"], "absolute"),
    "override without a value": (["train.steps="], "train.steps"),
    "override without '='": (["steps"], "missing EQUAL"),
    "override syntax": (["train.steps=[1"], "train.steps=[1"),
    "unresolvable interpolation": (["train.steps=${nope}"], "'nope' not found"),
    # sizes and values
    "zero batch": (["train.batch_size=0"], "batch_size must be positive"),
    "negative steps": (["train.steps=-5"], "steps must be positive"),
    "zero width": (["model.n_embd=0"], "n_embd must be positive"),
    "negative learning rate": (["optim.lr=-1"], "lr must be positive"),
    "dropout out of range": (["model.dropout=2"], "dropout"),
    "heads not dividing the width": (["model.n_embd=100", "model.n_head=3"], "not divisible"),
    "rope with an odd head size": (["model.pos=rope", "model.n_embd=36", "model.n_head=4"], "even head"),
    "sequence past the position table": (["task.max_len=200"], "max_seq_len"),
    "text window past the position table": (
        [*TEXT, "task.data.path={data}/good.txt", "task.seq_len=2048"], "position table"),
    "lengths not a range": (["task.min_len=9", "task.max_len=3"], "larger than"),
    "more held-out examples than exist": (["task.max_len=2", "task.n_eval=1000"], "n_eval"),
    "noam without warm-up": (["schedule=noam", "schedule.warmup_steps=0"], "warmup_steps > 0"),
    "label smoothing of 1": (["train.label_smoothing=1"], "label_smoothing"),
    "unknown stop signal": (["train.stop_signal=SIGNOPE"], "not a signal name"),
    "zero processes": (["launch.nproc_per_node=0"], "nproc_per_node must be positive"),
    # batches and strategies
    "micro-batch not dividing the batch": (["train.micro_batch_size=48"], "micro_batch_size=48"),
    "batch not divisible over ranks": (
        ["parallel=ddp", "plan=true", "plan.world_size=3"], "not divisible by the 3 data-parallel ranks"),
    "ddp in one process": (["parallel=ddp"], "launch.nproc_per_node=2"),
    "fsdp in one process": (["parallel=fsdp"], "launch.nproc_per_node=2"),
    "pipeline in one process": (["parallel=pipeline", "model.tie_embeddings=false"], "launch.nproc_per_node=2"),
    "pipeline stages more than layers": (
        ["parallel=pipeline", "model.tie_embeddings=false", "plan=true", "plan.world_size=4"],
        "at least one block per stage"),
    "pipeline micro-batches not dividing the batch": (
        ["parallel=pipeline", "model.tie_embeddings=false", "parallel.n_microbatches=5", "plan=true",
         "plan.world_size=2", "model.n_layer=2"], "parallel.n_microbatches=5"),
    "unknown pipeline schedule": (["parallel=pipeline", "parallel.schedule=zigzag"], "zigzag"),
    "stages per rank without interleaving": (["parallel=pipeline", "parallel.stages_per_rank=2"], "interleaved"),
    "zero fsdp replicas": (["parallel=fsdp", "parallel.replicate=0"], "replicate must be positive"),
    "fsdp replicas not dividing the ranks": (
        ["parallel=fsdp", "plan=true", "plan.world_size=4", "parallel.replicate=3"], "replicate=3"),
    "a GPU that is not there": (["device=cuda:7"], "device"),
    # the corpus and the tokenizer
    "text task without a corpus": (["task=text"], "task.data.path"),
    "corpus missing": ([*TEXT, "task.data.path={data}/absent.txt"], "no such file or folder"),
    "corpus empty": ([*TEXT, "task.data.path={data}/empty.txt"], "is empty"),
    "corpus only white space": ([*TEXT, "task.data.path={data}/blank"], "is empty"),
    "folder without text files": ([*TEXT, "task.data.path={data}/nothing"], "without .txt files"),
    "corpus not UTF-8": ([*TEXT, "task.data.path={data}/latin1.txt"], "not UTF-8"),
    "corpus binary": ([*TEXT, "task.data.path={data}/binary.txt"], "looks binary"),
    "corpus shorter than one window": ([*TEXT, "task.data.path={data}/short.txt"], "too few"),
    "unknown tokenizer": ([*TEXT, "task.data.path={data}/good.txt", "task.tokenizer=gpt7"], "not a tokenizer"),
    "tokenizer file missing": (
        [*TEXT, "task.data.path={data}/good.txt", "task.tokenizer=gpt2", "task.tokenizer_file={data}/no.tiktoken"],
        "no such file"),
    "tokenizer file corrupt": (
        [*TEXT, "task.data.path={data}/good.txt", "task.tokenizer=gpt2", "task.tokenizer_file={data}/bad.tiktoken"],
        "not a .tiktoken ranks file"),
    "tokenizer file for another tokenizer": (
        [*TEXT, "task.data.path={data}/good.txt", "task.tokenizer_file={data}/bad.tiktoken"],
        "works with task.tokenizer=gpt2"),
    # resuming and the run dir
    "resume from nowhere": (["resume={data}/no/such/checkpoint"], "no such file"),
    "resume from a folder without checkpoints": (["resume={data}/nothing"], "no checkpoint found"),
    "resume a damaged checkpoint": (["resume={damaged}"], "damaged: meta.pt is 0 bytes"),
    "resume into another model": (["model.n_embd=64"], "different model"),
    "continue under another config": (["optim.lr=0.01"], "different config (optim.lr"),
    "start over without overwrite": (["resume=never"], "resume=never overwrite=true"),
    "run dir that cannot be made": (["hydra.run.dir={data}/good.txt/run"], "cannot write"),
}


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


@pytest.fixture(scope="module")
def existing(tmp_path_factory) -> dict[str, Path]:
    """A finished run, a damaged checkpoint, and a folder of bad (and one good) inputs."""
    root = tmp_path_factory.mktemp("existing")
    done = call_txtrain(*RUN, "task.n_eval=50", f"hydra.run.dir={root / 'run'}")
    assert done.status == 0, done.stderr
    damaged = root / "damaged"
    shutil.copytree(root / "run" / "checkpoints" / "step_000002", damaged)
    (damaged / "meta.pt").write_bytes(b"")
    data = root / "data"
    write(data / "good.txt", "Socrates asked and Glaucon answered, at some length. " * 200)
    write(data / "empty.txt", "")
    write(data / "blank" / "a.txt", "  \n\n")
    (data / "nothing").mkdir()
    write(data / "latin1.txt", "café".encode("latin-1"))
    write(data / "binary.txt", b"ab\0cd" * 100)
    write(data / "short.txt", "too short")
    write(data / "bad.tiktoken", "this is not base64 ranks\n")
    return {"run": root / "run", "damaged": damaged, "data": data}


def fill_in(arg: str, places: dict[str, Path]) -> str:
    for name, path in places.items():
        arg = arg.replace("{" + name + "}", str(path))
    return arg


def snapshot(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_the_table_covers_enough_mistakes():
    assert len(CASES) >= 25


@pytest.mark.parametrize("overrides,fragment", CASES.values(), ids=CASES.keys())
def test_a_mistake_is_one_line_status_2_and_writes_nothing(existing, tmp_path, overrides, fragment):
    run_dir = shutil.copytree(existing["run"], tmp_path / "run")
    before = snapshot(run_dir)
    args = [fill_in(arg, existing) for arg in overrides]
    outcome = call_txtrain(*RUN, f"hydra.run.dir={run_dir}", *args)
    lines = outcome.stderr.strip().splitlines()
    assert outcome.status == 2, outcome.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    assert fragment in lines[0]
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert snapshot(run_dir) == before


def test_a_refused_command_leaves_no_run_dir_behind(tmp_path):
    outcome = call_txtrain("parallel=ddp", f"hydra.run.dir={tmp_path / 'new'}")
    assert outcome.status == 2 and not (tmp_path / "new").exists()


# --- random override strings ----------------------------------------------------------------
KEYS = ["model", "task", "optim", "schedule", "precision", "parallel", "experiment",
        "model.n_layer", "model.n_head", "model.n_embd", "model.pos", "model.norm", "model.dropout",
        "model.max_seq_len", "model.d_ff", "model.vocab_multiple", "model.tie_embeddings",
        "task.name", "task.min_len", "task.max_len", "task.n_symbols", "task.n_eval", "task.modulus",
        "task.seq_len", "task.tokenizer", "train.steps", "train.batch_size", "train.micro_batch_size",
        "train.grad_clip", "train.label_smoothing", "train.stop_signal", "train.keep_last",
        "optim.lr", "optim.beta1", "optim.weight_decay", "schedule.warmup_steps",
        "schedule.min_lr_ratio", "parallel.schedule", "parallel.n_microbatches", "parallel.replicate",
        "parallel.stages_per_rank", "plan.world_size", "plan.device_memory_gb", "seed", "device",
        "resume", "logger", "compile", "nope", "model.nope", "train"]
VALUES = st.one_of(
    st.integers(-3, 40).map(str), st.sampled_from(["0", "1e-3", "-0.5", "2.5", "1e400", "nan", "inf",
                                                    "true", "null", "[]", "[1,2]", "{}", "''", "${seed}",
                                                    "${nope}", "none", "cuda", "gpt2", "SIGUSR1"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=12))
OVERRIDES = st.one_of(
    st.tuples(st.sampled_from(["", "+", "++"]), st.sampled_from(KEYS), VALUES).map(lambda t: f"{t[0]}{t[1]}={t[2]}"),
    st.sampled_from(KEYS).map(lambda key: f"~{key}"),
    st.text(max_size=12).filter(lambda text: not text.startswith("-")),  # anything at all but a flag
)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OVERRIDES, min_size=1, max_size=4))
def test_random_overrides_never_end_in_a_traceback(overrides):
    # plan=true last: an override that happens to be valid plans the run instead of training it.
    outcome = call_txtrain(*overrides, "plan=true")
    lines = outcome.stderr.strip().splitlines()
    assert outcome.status in (0, 2), outcome
    if outcome.status == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    assert "Traceback" not in outcome.stderr + outcome.stdout


def test_an_unexpected_failure_after_composing_keeps_its_traceback(tmp_path, monkeypatch):
    """Only mistakes get one line: a bug in txtrain must show where it happened."""
    from txtrain import cli, train

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train, "Trainer", broken)
    with pytest.raises(cli.Bug) as raised:
        call_txtrain(*RUN, f"hydra.run.dir={tmp_path / 'run'}")
    assert isinstance(raised.value.__cause__, ZeroDivisionError)
