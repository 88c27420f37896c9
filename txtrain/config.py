"""Typed schemas for the config tree.

Every YAML file under ``configs/`` is merged onto one of these dataclasses, so a key that
does not exist, a value of the wrong type or a choice outside its enum fails while Hydra
composes the config. Checks that need more than one field live in ``__post_init__``, which
runs when the composed config is turned into these objects (``OmegaConf.to_object``).
"""

from __future__ import annotations

import functools
import signal
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A value the user chose is impossible. Reported as one line, never as a traceback."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (the loss diverged, say). Reported as one line, exit status 1."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def require_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        require(value > 0, f"{owner}.{name} must be positive, got {value}")


class Choice(str, Enum):
    """One of a fixed set of words. Names equal values, so YAML and the command line use plain
    words, and a member compares and prints as its word (``cfg.pos == "rope"``)."""

    def __str__(self) -> str:
        return self.value


class Pos(Choice):
    learned = "learned"
    sinusoidal = "sinusoidal"
    rope = "rope"
    none = "none"


class Arch(Choice):
    gpt = "gpt"
    encoder = "encoder"  # BERT: bidirectional, trained to fill masked tokens
    encoder_decoder = "encoder_decoder"


class Norm(Choice):
    pre = "pre"
    post = "post"


class Activation(Choice):
    gelu = "gelu"
    relu = "relu"


class AttentionImpl(Choice):
    manual = "manual"
    sdpa = "sdpa"


class SyntheticKind(Choice):
    copy = "copy"
    reverse = "reverse"
    fibonacci = "fibonacci"


class Logger(Choice):
    jsonl = "jsonl"  # always on; named alone: no other logger
    tensorboard = "tensorboard"
    wandb = "wandb"


def logger_list(value: Any) -> list[Logger]:
    """``logger=wandb`` or ``logger=[tensorboard,wandb]`` as a list of loggers."""
    names = list(value) if isinstance(value, (list, tuple)) else [value]
    for name in names:
        require(isinstance(name, str) and name in Logger.__members__,
                f"logger: unknown logger {name!r}; choose jsonl, tensorboard or wandb, or a list "
                "of them: logger=[tensorboard,wandb] (JSONL is always on)")
    return [Logger(name) for name in dict.fromkeys(names)]


class Dtype(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class OptimizerName(Choice):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"
    muon = "muon"  # Muon for the blocks' 2-D matrices, AdamW for the rest (txtrain/optim.py)


class ScheduleName(Choice):
    constant = "constant"
    cosine = "cosine"
    noam = "noam"
    wsd = "wsd"


# schedule=wsd: how the learning rate falls over the decay: linear, or 1-sqrt (1 - sqrt of the
# progress; Hägele et al., 2024). Built by call, since "1-sqrt" is no Python name.
DecayShape = Choice("DecayShape", {"linear": "linear", "1-sqrt": "1-sqrt"})


@dataclass
class ModelConfig:
    arch: Arch = Arch.gpt  # encoder_decoder: the 2017 Transformer (n_layer counts decoder blocks)
    n_encoder_layer: Optional[int] = None  # encoder_decoder: encoder blocks; None means n_layer
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    d_ff: Optional[int] = None  # feed-forward width; None means 4 * n_embd
    max_seq_len: int = 1024  # size of the learned position table; a cap for the others
    pos: Pos = Pos.learned
    norm: Norm = Norm.pre
    activation: Activation = Activation.gelu
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    impl: AttentionImpl = AttentionImpl.sdpa
    rope_base: float = 10000.0
    activation_checkpointing: bool = False  # keep only block inputs; recompute the rest in backward
    vocab_multiple: int = 64  # pad the embedding rows to a multiple (matmul-friendly); never in the loss

    def __post_init__(self) -> None:
        require_positive("model", n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, max_seq_len=self.max_seq_len,
                         vocab_multiple=self.vocab_multiple)
        require(self.n_embd % self.n_head == 0,
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                "choose a width that is a multiple of the number of heads")
        if self.d_ff is not None:
            require_positive("model", d_ff=self.d_ff)
        if self.n_encoder_layer is not None:
            require_positive("model", n_encoder_layer=self.n_encoder_layer)
        require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.pos == Pos.rope:
            require((self.n_embd // self.n_head) % 2 == 0,
                    "model.pos=rope needs an even head dimension (n_embd / n_head)")

    @property
    def ffn_width(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.n_embd


@dataclass
class TaskConfig:
    name: str = MISSING


@dataclass
class SyntheticTaskConfig(TaskConfig):
    """copy / reverse: a string of symbols; fibonacci: two seeds, then the next terms.

    Lengths count symbols for copy and reverse and generated terms for fibonacci.
    """

    name: SyntheticKind = SyntheticKind.reverse
    n_symbols: int = 10
    min_len: int = 1
    max_len: int = 16
    eval_min_len: Optional[int] = None  # held-out lengths; None means the training range
    eval_max_len: Optional[int] = None
    n_eval: int = 1000  # size of the fixed held-out set
    modulus: int = 1000  # fibonacci: terms are taken modulo this bound
    lsb_first: bool = True  # fibonacci: write digits least significant first (carries flow forward)

    def __post_init__(self) -> None:
        require_positive("task", n_symbols=self.n_symbols, min_len=self.min_len,
                         max_len=self.max_len, n_eval=self.n_eval)
        require(self.min_len <= self.max_len,
                f"task.min_len={self.min_len} is larger than task.max_len={self.max_len}")
        require(self.modulus >= 2, f"task.modulus must be at least 2, got {self.modulus}")
        lo, hi = self.eval_lengths
        require(0 < lo <= hi, f"task.eval_min_len={lo} and task.eval_max_len={hi} are not a range")

    @property
    def eval_lengths(self) -> tuple[int, int]:
        lo = self.min_len if self.eval_min_len is None else self.eval_min_len
        hi = self.max_len if self.eval_max_len is None else self.eval_max_len
        return lo, hi


@dataclass
class CorpusConfig:
    path: Optional[str] = None  # a .txt file or a folder of them (searched recursively)
    url: Optional[str] = None  # where to fetch one .txt file when there is no local copy
    sha256: Optional[str] = None  # the download's checksum, verified before it is used


@dataclass
class TextTaskConfig(TaskConfig):
    """Next-token prediction on a text corpus, read as random windows of ``seq_len`` tokens."""

    name: str = "text"
    data: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: str = "gpt2"  # gpt2 or another tiktoken encoding | bytes | char
    tokenizer_file: Optional[str] = None  # local .tiktoken ranks (offline machines)
    seq_len: int = 256
    val_fraction: float = 0.05  # held out from the end of the corpus
    eval_tokens: Optional[int] = None  # validate on at most this many tokens; None: all of them
    cache_dir: Optional[str] = None  # token cache; None: $TXTRAIN_CACHE or ~/.cache/txtrain
    prompts: list[str] = field(default_factory=lambda: ["\n"])  # for samples.txt at each eval
    sample_tokens: int = 200
    temperature: float = 0.8  # 0: always the likeliest token
    top_k: Optional[int] = 40
    mask_fraction: float = 0.15  # model.arch=encoder: the share of positions to recover (BERT's 15%)

    def __post_init__(self) -> None:
        require_positive("task", seq_len=self.seq_len)
        require(0 < self.mask_fraction < 1, f"task.mask_fraction must be in (0, 1), got {self.mask_fraction}")
        require(self.tokenizer_file is None or self.tokenizer not in ("bytes", "char"),
                f"task.tokenizer_file works with task.tokenizer=gpt2, not {self.tokenizer} "
                "(which needs no file)")
        require(self.temperature >= 0, "task.temperature must not be negative (0: greedy)")
        require(0 < self.val_fraction < 1, f"task.val_fraction must be in (0, 1), got {self.val_fraction}")
        require(self.sample_tokens >= 0, "task.sample_tokens must not be negative")
        if self.top_k is not None:
            require_positive("task", top_k=self.top_k)
        if self.eval_tokens is not None:
            require_positive("task", eval_tokens=self.eval_tokens)


@dataclass
class LaunchConfig:
    """``launch.nproc_per_node=N`` makes txtrain start itself under torch's elastic launcher
    (what ``torchrun --standalone --nproc-per-node=N`` does), one process per device."""

    nproc_per_node: int = 1

    def __post_init__(self):
        require_positive("launch", nproc_per_node=self.nproc_per_node)


@dataclass
class PrecisionConfig:
    name: Dtype = Dtype.fp32
    init_scale: float = 65536.0  # fp16: the first loss scale; halved on overflow, doubled when calm
    tf32: bool = True  # CUDA (Ampere and newer): fp32 matmuls on tensor cores, 10-bit mantissa inputs

    def __post_init__(self):
        require_positive("precision", init_scale=self.init_scale)


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    momentum: float = 0.9  # sgd; muon: the Muon matrices' (Nesterov) momentum
    # muon: the peak learning rate of the blocks' 2-D matrices (Muon's orthogonalised update);
    # optim.lr, beta1/2 and eps are the AdamW part's (embeddings, head, norms, biases). The
    # schedule scales both alike.
    muon_lr: float = 0.02

    def __post_init__(self) -> None:
        require_positive("optim", lr=self.lr, eps=self.eps, muon_lr=self.muon_lr)
        require(self.weight_decay >= 0, "optim.weight_decay must not be negative")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)")
        require(0 <= self.momentum < 1, "optim.momentum must be in [0, 1)")


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.cosine
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine, wsd: the floor, as a fraction of optim.lr
    decay_fraction: float = 0.2  # wsd: the share of the steps after warmup spent decaying
    decay_shape: DecayShape = DecayShape.linear  # wsd: linear or 1-sqrt down to the floor

    def __post_init__(self) -> None:
        require(self.warmup_steps >= 0, "schedule.warmup_steps must not be negative")
        require(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in [0, 1]")
        require(0 < self.decay_fraction <= 1, "schedule.decay_fraction must be in (0, 1]")
        require(self.name != ScheduleName.noam or self.warmup_steps > 0,
                "schedule=noam needs schedule.warmup_steps > 0")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # global: sequences per optimizer step, all ranks and micro-batches
    micro_batch_size: Optional[int] = None  # per rank and forward pass; None: no accumulation
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    label_smoothing: float = 0.0
    # The head and the loss run over this many tokens at a time, each chunk's gradients taken
    # at once: the whole (tokens x vocabulary) logits never exist (model/chunked_loss.py).
    # 0: the plain path (whole logits, F.cross_entropy).
    loss_chunk_tokens: int = 512
    log_every: int = 10
    eval_every: int = 250  # 0: only at the end
    save_every: int = 500  # 0: only at the end
    keep_last: int = 0  # keep only the newest K checkpoints; 0: keep all
    stop_signal: Optional[str] = None  # also stop gracefully on this signal (SLURM's --signal: SIGUSR1)
    eval_batch_size: int = 500
    skip_nonfinite: int = 0  # 0: stop at a non-finite loss; K: skip up to K such steps in a row
    patience: Optional[int] = None  # stop after K evaluations without improving the task's main metric
    min_delta: float = 0.0  # what counts as improving (train.patience): by more than this

    def __post_init__(self) -> None:
        require_positive("train", steps=self.steps, batch_size=self.batch_size,
                         log_every=self.log_every, eval_batch_size=self.eval_batch_size)
        if self.micro_batch_size is not None:
            require_positive("train", micro_batch_size=self.micro_batch_size)
        require(self.skip_nonfinite >= 0, "train.skip_nonfinite must not be negative")
        require(self.eval_every >= 0 and self.save_every >= 0 and self.keep_last >= 0,
                "train.eval_every, train.save_every and train.keep_last must not be negative")
        require(self.stop_signal is None or self.stop_signal in signal.Signals.__members__,
                f"train.stop_signal={self.stop_signal} is not a signal name (SIGUSR1, SIGTERM, ...)")
        require(self.grad_clip >= 0, "train.grad_clip must not be negative")
        require(0 <= self.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
        require(self.loss_chunk_tokens >= 0, "train.loss_chunk_tokens must not be negative (0: off)")
        require(self.patience is None or self.patience >= 0, "train.patience must not be negative")
        require(not self.patience or self.eval_every > 0,
                f"train.patience={self.patience} counts evaluations, but train.eval_every=0 evaluates only "
                "at the end; set train.eval_every")
        require(self.min_delta >= 0, f"train.min_delta must not be negative, got {self.min_delta}")


@dataclass
class DebugConfig:
    overfit_batch: bool = False  # train on one fixed batch: the loss must go to ~0


@dataclass
class PlanConfig:
    """The memory planner. ``plan=true`` (short for ``plan.only=true``) prints the plan and
    exits without training or allocating the model."""

    only: bool = False
    device_memory_gb: Optional[float] = None  # GiB per device: say whether the run fits, and what would
    world_size: Optional[int] = None  # ranks to plan for; None: the processes of this run

    def __post_init__(self) -> None:
        if self.device_memory_gb is not None:
            require_positive("plan", device_memory_gb=self.device_memory_gb)
        if self.world_size is not None:
            require_positive("plan", world_size=self.world_size)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Any = MISSING
    parallel: Any = MISSING  # one strategy's settings (txtrain/parallel/specs.py)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    seed: int = 0
    # What the run returns to a sweeper that optimizes it (hydra/sweeper=optuna): a metric of
    # its final result (exact_match, val_loss, ...); None: the task's evaluation loss.
    objective: Optional[str] = None
    resume: str = "auto"  # auto (latest in the run dir) | never | a checkpoint path
    overwrite: bool = False  # with resume=never: start over in a run dir that holds checkpoints
    progress: bool = True  # progress bar, shown only on a terminal
    plot: bool = True  # loss.png in the run dir at the end (txtrain-plot draws it any time later)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile each block (the first steps pay for compiling)
    keep_freed_memory: bool = True  # CPU: glibc reuses freed big blocks (faster steps, more resident memory)
    # JSONL always, plus tensorboard and/or wandb: logger=wandb, logger=[tensorboard,wandb].
    # Any: a word or a list; __post_init__ makes it a list of Logger.
    logger: Any = "jsonl"

    def __post_init__(self) -> None:  # checks across groups
        self.logger = logger_list(self.logger)
        self.parallel.check_run(self)
        seq2seq = self.model.arch == Arch.encoder_decoder
        require(not (seq2seq and isinstance(self.task, TextTaskConfig)),
                "model.arch=encoder_decoder needs a source and a target: train it on copy, "
                "reverse or fibonacci; the text task is for model.arch=gpt or encoder")
        require(self.model.arch != Arch.encoder or isinstance(self.task, TextTaskConfig),
                "model.arch=encoder learns to fill masked tokens of text: train it on a text task "
                "(task=text or task=socrates); copy, reverse and fibonacci are for gpt and "
                "encoder_decoder")


@functools.cache  # once a process: the schemas do not change, and storing them takes 25 ms
def register_configs() -> None:
    """The typed schemas the config files build on. They are stored as configs of their own,
    not as a group, so that ``--help`` lists only the groups a user picks from."""
    store = ConfigStore.instance()
    store.store(name="txtrain_schema", node=Config)
    store.store(name="task_schema_synthetic", node=SyntheticTaskConfig)
    store.store(name="task_schema_text", node=TextTaskConfig)
    # Each strategy's schema, under its own name, with that name set; imported here because
    # the strategies' settings check themselves with require() from this module.
    from txtrain.parallel.specs import STRATEGIES

    for name, spec in STRATEGIES.items():
        store.store(name=f"parallel_schema_{name}", node=spec.settings(name=name))
