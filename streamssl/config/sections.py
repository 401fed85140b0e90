"""The run configuration's sections: one frozen dataclass per stage of the flow, each field with its help text
and allowed range, and ``Config`` that holds them all (checks that span sections in ``__post_init__``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from streamssl.config.fields import ConfigError
from streamssl.config.fields import setting as _f
from streamssl.config.method_sections import BYOLConfig, DeepClusterConfig, MoCoConfig, NPIDConfig, SimCLRConfig
from streamssl.urls import SourceError, check_pattern, check_redis_url, check_url, is_redis_url

ENV_PREFIX = "STREAMSSL_"
DEBUG_ENV = "STREAMSSL_DEBUG"  # the CLI's --debug, not a configuration key
DEFAULT_PROFILE = "cpu-small"
PER_GROUP_P = ("jitter_p", "grayscale_p", "blur_p", "solarize_p")  # augment probabilities settable per group


@dataclass(frozen=True)
class SourceConfig:
    """Where shard URLs come from (source.py) and how their members become samples (shards.py, samples.py)."""

    urls: tuple[str, ...] = _f((), "Shard sources: a glob or brace pattern (shards/{000000..000999}.tar), "
                               "a folder to follow for new *.tar, http(s) URLs, or redis://host:port/db to "
                               "read the ingest stream. Empty: the embedded demo stream.")
    cycle: bool = _f(True, "Pattern sources: start over when every shard was read (reshuffled each pass).")
    settle_s: float = _f(5.0, "Folder sources: a *.tar unchanged this long counts as complete. Producers that "
                         "write then rename need none; raise it for slow network copies.", ge=0)
    poll_s: float = _f(2.0, "Folder and Redis sources: how often to look for new shards.", gt=0)
    stream_key: str = _f("streamssl:shards", "Redis source: the stream producers XADD shard URLs to.")
    group: str = _f("learners", "Redis source: the consumer group learners read through.")
    consumer: str = _f("", "Redis source: this learner's consumer name. Empty: host name and pid.")
    claim_idle_s: float = _f(600.0, "Redis source: shards pending this long on a consumer are reclaimed "
                             "(XAUTOCLAIM). Keep it above the time one shard takes to train on.", gt=0)
    allow_pipe: bool = _f(False, "Accept webdataset pipe: URLs. They run shell commands and URLs may come "
                          "from others through Redis: leave off unless every producer is trusted.")
    shuffle_buffer: int = _f(2000, "Samples held to decorrelate the stream. Larger mixes shards better and "
                             "costs memory (encoded bytes).", ge=0)
    max_pixels: int = _f(40_000_000, "Images declaring more pixels than this are skipped as bombs.", gt=0)
    max_member_bytes: int = _f(64 << 20, "Tar members larger than this are skipped.", gt=0)
    seed: int = _f(0, "Seed of the shard reshuffles and the shuffle buffer.", ge=0)

    def __post_init__(self) -> None:
        try:
            for url in self.urls:
                if is_redis_url(url):
                    check_redis_url(url, "Redis URL")
                else:
                    check_url(url, allow_pipe=self.allow_pipe)
                    check_pattern(url)
        except SourceError as exc:
            raise ConfigError(f"source.urls: {exc}") from None


@dataclass(frozen=True)
class ReplayConfig:
    """Replay buffer between the samples and the augment stage (stream/replay.py), for correlated streams."""

    policy: str = _f("none", "none (train on the stream as it comes), fifo (the recent past), reservoir (a "
                     "uniform sample of the whole stream) or minred (evict the most redundant sample: the "
                     "most similar to its nearest neighbour; for streams whose content comes in long runs).",
                     choices=("none", "fifo", "reservoir", "minred"))
    max_samples: int = _f(10_000, "Samples the buffer holds at most.", ge=1)
    max_bytes: int = _f(256 << 20, "Encoded bytes the buffer holds at most (checkpoints carry the buffer: this "
                        "bounds what each one adds).", ge=1)
    ratio: float = _f(1.0, "Replay ratio: samples trained on per arriving sample, on average (2: each image is "
                      "seen about twice). Above 1 when the learner is faster than the stream.", gt=0)
    min_fill: int = _f(1000, "Samples the buffer holds before training starts drawing from it.", ge=1)
    seed: int = _f(0, "Seed of the buffer's draws and of reservoir sampling.", ge=0)


@dataclass(frozen=True)
class AugmentConfig:
    """SwAV multi-crop (augment/): decode and views, on DALI or its torchvision twin."""

    backend: str = _f("auto", "dali, torchvision, or auto (DALI when importable).",
                      choices=("auto", "dali", "torchvision"))
    n_views: tuple[int, ...] = _f((2, 6), "Views per size, e.g. 2 global and 6 local.")
    sizes: tuple[int, ...] = _f((224, 96), "Output side in pixels per size group.")
    min_scale: tuple[float, ...] = _f((0.14, 0.05), "RandomResizedCrop lower area fraction per size group.")
    max_scale: tuple[float, ...] = _f((1.0, 0.14), "RandomResizedCrop upper area fraction per size group.")
    flip_p: float = _f(0.5, "Horizontal flip probability.", ge=0, le=1)
    jitter_strength: float = _f(1.0, "Colour jitter strength s (brightness/contrast/saturation 0.8s, hue "
                                "0.2s). Lower it for colour-defined classes.", ge=0)
    jitter_p: tuple[float, ...] = _f((0.8,), "Probability of colour jitter: one value, or one per size group "
                                     "(asymmetric views, as BYOL's).", ge=0, le=1)
    grayscale_p: tuple[float, ...] = _f((0.2,), "Probability of grayscale: one value, or one per size group.",
                                        ge=0, le=1)
    blur_p: tuple[float, ...] = _f((0.5,), "Probability of Gaussian blur: one value, or one per size group "
                                   "(BYOL: [1.0, 0.1] on two groups of one view). Blur dominates CPU cost: "
                                   "lower it on CPU.", ge=0, le=1)
    blur_sigma: tuple[float, ...] = _f((0.1, 2.0), "Gaussian blur sigma range (min, max).")
    solarize_p: tuple[float, ...] = _f((0.0,), "Probability of solarization: one value, or one per size group "
                                       "(0 in SwAV; BYOL: [0.0, 0.2]).", ge=0, le=1)
    mean: tuple[float, ...] = _f((0.485, 0.456, 0.406), "Normalisation mean per channel (0-1 scale).")
    std: tuple[float, ...] = _f((0.228, 0.224, 0.225), "Normalisation std per channel (0-1 scale).")
    n_threads: int = _f(2, "Decode and augmentation threads (DALI), or worker processes of the torchvision "
                        "twin on a GPU run (on a CPU run the twin works in the feeder thread).", ge=1)
    prefetch: int = _f(2, "Batches prepared ahead of the learner.", ge=1)
    seed: int = _f(0, "Seed of the augmentation RNG.", ge=0)

    def __post_init__(self) -> None:
        for name in PER_GROUP_P:  # a bare number (Python callers) is one value for every group, as in TOML
            value = getattr(self, name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                object.__setattr__(self, name, (float(value),))
        groups = len(self.sizes)
        for name in ("n_views", "min_scale", "max_scale"):
            if len(getattr(self, name)) != groups:
                raise ConfigError(f"augment.{name}: needs one entry per size group ({groups}), "
                                  f"got {len(getattr(self, name))}")
        for name in PER_GROUP_P:
            if len(getattr(self, name)) not in (1, groups):
                raise ConfigError(f"augment.{name}: one value for every size group, or one per size group "
                                  f"({groups}); got {len(getattr(self, name))}")
        if any(v < 1 for v in self.n_views) or any(s < 1 for s in self.sizes):
            raise ConfigError("augment.n_views and augment.sizes: entries must be >= 1")
        for lo, hi in zip(self.min_scale, self.max_scale, strict=True):
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"augment.min_scale/max_scale: need 0 < min <= max <= 1, got ({lo}, {hi})")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError("augment.blur_sigma: needs (min, max) with 0 < min <= max")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("augment.mean/std: need 3 entries each, std > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Trunk, projection head and prototypes (model.py)."""

    arch: str = _f("resnet50", "torchvision ResNet trunk; resnet10 is ResNet-18 with one block "
                   "per stage (torchvision's ResNet class, BasicBlock, [1, 1, 1, 1]).",
                   choices=("resnet10", "resnet18", "resnet34", "resnet50"))
    small_stem: bool = _f(False, "3x3 first conv (stride: stem_stride) and no max-pool (unless "
                          "stem_pool), for 28-96 px inputs.")
    stem_stride: int = _f(1, "Stride of the small stem's conv: 2 halves the resolution of every stage (~3x the "
                          "images/s on CPU) for small inputs on slow machines. Needs small_stem.", choices=(1, 2))
    stem_pool: bool = _f(False, "Keep torchvision's 3x3/2 max-pool after the small stem's conv: with stem_stride "
                         "1, the stage sizes and about the cost of stride 2, but the first conv sees every "
                         "pixel. Needs small_stem.")
    hidden_dim: int = _f(2048, "Projection head hidden width. 0: a single linear layer.", ge=0)
    out_dim: int = _f(128, "Embedding dimension D. 0: no head, prototypes sit on the trunk features.", ge=0)
    n_prototypes: int = _f(3000, "Number of prototypes K. About 10x the expected number of classes.", ge=2)
    channels_last: bool = _f(False, "channels_last memory format: faster convolutions on most CPUs/GPUs.")

    def __post_init__(self) -> None:
        if self.stem_stride != 1 and not self.small_stem:
            raise ConfigError("model.stem_stride: 2 needs model.small_stem = true")
        if self.stem_pool and not self.small_stem:
            raise ConfigError("model.stem_pool: needs model.small_stem = true (the default stem pools already)")


@dataclass(frozen=True)
class LearnerConfig:
    """The method (learner/methods/), its objective and the optimisation (engine.py, optim.py). The SwAV settings
    (temperature to freeze_prototypes_steps) are here for the SwAV method; each other method has a section."""

    method: str = _f("swav", "The self-supervised method; each but SwAV has its own section ([simclr], [moco], "
                     "[byol], [deepcluster], [npid]).",
                     choices=("swav", "simclr", "moco", "byol", "deepcluster", "npid"))
    batch_size: int = _f(256, "Images per step (each gives every view).", ge=1)
    temperature: float = _f(0.1, "Softmax temperature of the swapped prediction.", gt=0)
    epsilon: float = _f(0.05, "Sinkhorn entropy regularisation. Lower it (0.03) if codes stay soft; raise "
                        "it if training collapses.", gt=0)
    sinkhorn_iters: int = _f(3, "Sinkhorn-Knopp iterations.", ge=1)
    crops_for_assign: tuple[int, ...] = _f((0, 1), "Views whose codes are predicted (the global ones).")
    queue_length: int = _f(0, "Queue rows Q per assignment view. Use it when B < K/ a few: it enlarges the "
                           "Sinkhorn problem so equipartition is meaningful. The whole job's: each of N ranks "
                           "keeps Q/N rows of its own batches (as the authors split it). 0: off.", ge=0)
    queue_start_step: int = _f(0, "First step the (full) queue may be used. Let features settle first.", ge=0)
    freeze_prototypes_steps: int = _f(0, "Prototypes get no update for this many steps.", ge=0)
    optimizer: str = _f("lars", "lars (large batches), sgd or adamw (small batches, short runs).",
                        choices=("lars", "sgd", "adamw"))
    base_lr: float = _f(0.6, "Peak learning rate, reached at the end of warmup.", gt=0)
    final_lr: float = _f(0.0006, "Cosine and budget schedules: the lowest learning rate.", ge=0)
    warmup_steps: int = _f(500, "Linear warmup from warmup_start_lr to base_lr.", ge=0)
    warmup_start_lr: float = _f(0.0, "Learning rate at step 0.", ge=0)
    schedule: str = _f("constant", "After warmup: constant (unbounded runs), cosine cycles of cycle_steps, or "
                       "budget: one cosine to final_lr over the run's budget (run.max_steps, max_images or "
                       "max_seconds, whichever ends first).", choices=("constant", "cosine", "budget"))
    cycle_steps: int = _f(100_000, "Cosine schedule: steps per cycle (restarts at base_lr).", ge=1)
    weight_decay: float = _f(1e-6, "Weight decay (not on BN and biases).", ge=0)
    momentum: float = _f(0.9, "SGD/LARS momentum; AdamW beta1.", ge=0, le=0.9999)
    trust_coefficient: float = _f(0.001, "LARS trust coefficient eta.", gt=0)
    bf16: bool = _f(False, "bfloat16 autocast of the forward pass (Sinkhorn stays float32), where the device "
                    "has native bfloat16 (CPU: AVX512_BF16 or AMX; GPU: Ampere+); elsewhere float32, with a "
                    "warning, because emulated bfloat16 is several times slower.")
    seed: int = _f(0, "Seed of the initialisation.", ge=0)

    def __post_init__(self) -> None:
        if not self.crops_for_assign or min(self.crops_for_assign) < 0:
            raise ConfigError("learner.crops_for_assign: needs at least one view index >= 0")
        if len(set(self.crops_for_assign)) != len(self.crops_for_assign):
            raise ConfigError("learner.crops_for_assign: view indices must be distinct")


@dataclass(frozen=True)
class StoreConfig:
    """Prototype store (store/)."""

    url: str = _f("", "redis://[:password@]host:port/db or rediss:// for TLS. Empty: a local file store "
                  "under checkpoint.dir (the embedded default).")
    prefix: str = _f("streamssl", "Key prefix of every Redis key this run writes.")
    every_steps: int = _f(50, "Write the prototypes every this many steps (and on shutdown).", ge=1)
    history: int = _f(20, "Earlier prototype versions kept for rollback.", ge=0)
    heartbeat_ttl_s: float = _f(30.0, "A learner missing heartbeats this long counts as gone.", gt=0)
    socket_timeout_s: float = _f(2.0, "Redis connect and read timeout. Short, so an unreachable store never "
                                 "stalls training; raise it only for slow links.", gt=0)
    retry_max_s: float = _f(30.0, "Longest wait between prototype write retries while Redis is down (the wait "
                            "doubles from 0.5 s up to this). Lower it to catch up sooner after an outage.", gt=0)
    tls_ca_file: str = _f("", "rediss:// only: CA bundle that signed the server certificate. Empty: the system "
                          "trust store.")
    tls_cert_file: str = _f("", "rediss:// only: client certificate, when the server asks for one (mutual TLS).")
    tls_key_file: str = _f("", "rediss:// only: private key of tls_cert_file.")

    def __post_init__(self) -> None:
        if self.url:
            try:
                check_redis_url(self.url, "store.url")
            except SourceError as exc:
                raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (checkpoint.py)."""

    dir: str = _f("runs/default", "Folder for checkpoints (and the local prototype store).")
    every_steps: int = _f(1000, "Checkpoint every this many steps.", ge=1)
    every_s: float = _f(600.0, "... or when this many seconds passed since the last one.", gt=0)
    idle_s: float = _f(30.0, "... or once the stream was quiet this long after steps not yet checkpointed "
                       "(their shards are then acknowledged). 0: never.", ge=0)
    keep: int = _f(3, "Checkpoints kept (oldest deleted first).", ge=1)
    resume: bool = _f(True, "Resume from the newest checkpoint in dir when there is one.")
    allow_new_source: bool = _f(False, "Resume a checkpoint written on other source.urls (passwords aside) and "
                                "continue its model on this stream, from the stream's start. Off: such a "
                                "checkpoint is refused, so a new stream never silently continues another run.")

    def __post_init__(self) -> None:
        if not self.dir.strip():
            raise ConfigError("checkpoint.dir: empty; name the run's own folder (for example runs/NAME): "
                              "checkpoints, the local store and the history live there")


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus endpoint (metrics.py)."""

    host: str = _f("127.0.0.1", "Address the /metrics and /healthz server binds to.")
    port: int = _f(9464, "Port of the metrics server. 0: a free port (logged at start). -1: no server.",
                   ge=-1, le=65535)
    stall_s: float = _f(300.0, "/healthz turns unhealthy when no step completed for this long.", gt=0)


@dataclass(frozen=True)
class RunConfig:
    """The daemon loop (daemon.py)."""

    device: str = _f("auto", "cpu, cuda, cuda:N or auto.")
    max_steps: int = _f(0, "Stop after this many steps. 0: run until stopped.", ge=0)
    max_images: int = _f(0, "Stop after this many images. 0: run until stopped.", ge=0)
    max_seconds: float = _f(0.0, "Stop after this much wall-clock time in the loop (budgeted benchmarks), "
                            "counted per process: a resumed run gets the whole budget again, and so does the "
                            "budget schedule. 0: run until stopped.", ge=0)
    log_every_steps: int = _f(10, "One progress line every this many steps.", ge=1)
    max_nonfinite_steps: int = _f(100, "Stop with an error, without a checkpoint, after this many steps in a row "
                                  "whose loss or gradients were not finite (each is skipped, so the model cannot "
                                  "learn). 0: never stop.", ge=0)
    threads: int = _f(0, "torch intra-op threads. 0: torch's default.", ge=0)


@dataclass(frozen=True)
class DistConfig:
    """Several processes under torchrun (streamssl/distributed.py; docs/architecture.md, "Many processes")."""

    sync_bn: bool = _f(True, "Batch norm over the whole job's batch (the papers' multi-GPU recipe; what makes N "
                       "ranks compute the step of one process on their concatenated batches).")
    backend: str = _f("auto", "auto (nccl on GPUs, gloo on CPUs), nccl or gloo.", choices=("auto", "nccl", "gloo"))
    timeout_s: float = _f(600.0, "A collective that waits longer than this fails the job with torch's error "
                          "(a rank that died or hangs), so that torchrun can restart it from the checkpoint.",
                          gt=0)
    wait_log_s: float = _f(60.0, "Ranks wait together while one has no batch (its source idle); say so every "
                           "this many seconds.", gt=0)


@dataclass(frozen=True)
class ProbeConfig:
    """Online kNN probe of the live trunk (probe.py), shown as a metric while the daemon runs."""

    dataset: str = _f("", "Labeled set: fashion-mnist[:FOLDER], an image folder (one sub-folder per class) or "
                      "labeled shards. Empty: no probe.")
    every_steps: int = _f(500, "Probe every this many steps. Training waits while it runs.", ge=1)
    limit_train: int = _f(1000, "Labeled images in the kNN memory. The probe's time grows with both limits.", ge=1)
    limit_test: int = _f(500, "Labeled images classified.", ge=1)
    k: int = _f(20, "Neighbours that vote.", ge=1)
    temperature: float = _f(0.07, "Vote weight temperature exp(sim / T).", gt=0)
    max_s: float = _f(60.0, "Abandon a probe that takes longer than this (counted, logged) and go on training.",
                      gt=0)


@dataclass(frozen=True)
class CollapseConfig:
    """Collapse detection and recovery (collapse.py)."""

    min_entropy_ratio: float = _f(0.1, "Collapse when the method's health signal (SwAV: code entropy) falls "
                                  "below this fraction of its healthy ceiling (SwAV: ln(min(images per step x "
                                  "assignment views, K))) ... 0: detection off.",
                                  ge=0, le=1)
    patience_steps: int = _f(50, "... for this many consecutive steps.", ge=1)
    snapshot_every_steps: int = _f(200, "Keep an in-memory snapshot of a healthy learner this often; recovery "
                                   "rolls back to it.", ge=1)
    recovery_steps: int = _f(500, "After a rollback, the method's recovery lasts this long (SwAV: prototypes "
                             "frozen, eps lowered).", ge=1)
    epsilon_factor: float = _f(0.6, "SwAV: eps is multiplied by this during recovery (sharper, more balanced codes).",
                               gt=0, le=1)


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    deepcluster: DeepClusterConfig = field(default_factory=DeepClusterConfig)
    npid: NPIDConfig = field(default_factory=NPIDConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        n_views = sum(self.augment.n_views)
        if n_views < 2:
            raise ConfigError("augment.n_views: every method needs at least 2 views in all")
        if max(self.learner.crops_for_assign) >= n_views:
            raise ConfigError(f"learner.crops_for_assign: view index {max(self.learner.crops_for_assign)} "
                              f"but only {n_views} views (augment.n_views)")
        if self.learner.method == "deepcluster" and self.deepcluster.memory_length < self.model.n_prototypes:
            raise ConfigError(f"deepcluster.memory_length: {self.deepcluster.memory_length} rows cannot seed "
                              f"{self.model.n_prototypes} centroids (model.n_prototypes); give it at least one row "
                              "per centroid, better 10-30")
        if self.learner.schedule == "budget" and not (self.run.max_steps or self.run.max_images
                                                       or self.run.max_seconds):
            raise ConfigError("learner.schedule = budget: needs a run budget to decay over (run.max_steps, "
                              "run.max_images or run.max_seconds); unbounded runs use constant or cosine")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(self, s)).items()}
                for s in SECTIONS}

    def to_toml(self) -> str:
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    """A TOML value: JSON's spelling, but for strings a TOML basic string with characters outside the BMP as
    they are (JSON writes them as surrogate pairs, which TOML refuses)."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if not isinstance(value, str):
        return json.dumps(value)
    escaped = (f"\\{ch}" if ch in '"\\' else f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch
               for ch in value)
    return '"' + "".join(escaped) + '"'


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
