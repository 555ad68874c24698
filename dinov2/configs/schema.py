"""The typed training configuration: every key, its type and default, in one place.

Names follow the official DINOv2 configs (``student``, ``teacher``, ``dino``, ``ibot``, ``crops``,
``optim``, ``train``) so recipes port unchanged; sections the official code lacks (``data``,
``compute``, ``checkpoint``, ``logging``, ``evaluation``, ``distributed``) are ours.
Schedules are in epochs of ``train.OFFICIAL_EPOCH_LENGTH`` steps, as in the official recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class StudentConfig:
    arch: str = "vit_large"  # vit_small | vit_base | vit_large | vit_giant2
    patch_size: int = 14
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    layerscale: float = 1.0e-5
    ffn_layer: str = "mlp"
    block_chunks: int = 0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    in_chans: int = 3
    attention_backend: str = "auto"
    pretrained_weights: str = ""
    # Overrides of the architecture's width/depth, for small experiments (null = the arch's own).
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: List[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class CropsConfig:
    global_crops_scale: List[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_scale: List[float] = field(default_factory=lambda: [0.05, 0.32])
    global_crops_size: int = 224
    local_crops_size: int = 98
    flip_p: float = 0.5
    color_jitter: List[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: List[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # global 1, global 2, local
    solarize_p: float = 0.2
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class OptimConfig:
    epochs: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    base_lr: float = 0.004
    warmup_epochs: int = 10
    min_lr: float = 1.0e-6
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    scaling_rule: str = "sqrt_wrt_1024"  # sqrt_wrt_1024 | linear_wrt_256 | none
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class TrainConfig:
    batch_size_per_gpu: int = 64
    OFFICIAL_EPOCH_LENGTH: int = 1250
    centering: str = "centering"  # centering | sinkhorn_knopp
    seed: int = 0
    max_nonfinite_steps: int = 10  # stop after this many skipped non-finite steps
    max_steps: Optional[int] = None  # stop early (e.g. a demo); schedules still span optim.epochs
    # When set, batch_size_per_gpu is derived as global_batch_size / (world size * grad_accum_steps)
    # (an error if that does not divide), so one recipe keeps its global batch on any world size.
    global_batch_size: Optional[int] = None


@dataclass
class DataConfig:
    # mnist_demo | folder:PATH | manifest:PATH | npy:PATH
    dataset: str = "mnist_demo"
    num_workers: int = 2


@dataclass
class ComputeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_accum_steps: int = 1
    compile: bool = False
    fused_optimizer: bool = True  # fused AdamW where the device supports it
    # CPU threads of the training process (torch.set_num_threads); None keeps torch's default.
    # On a small CPU leave a core to each data worker: oversubscribed cores slow both down.
    num_threads: Optional[int] = None


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000
    keep_last: int = 3
    # Stage the state to CPU and write it in a background thread (dcp.async_save) while training
    # goes on; the checkpoint appears (atomically) when the write completes.
    async_save: bool = False


@dataclass
class LoggingConfig:
    # Losses and collapse monitors are computed every step; writing them costs one host sync,
    # so the GPU recipes write every 10 steps.
    every_n_steps: int = 1
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class EvaluationConfig:
    """kNN of the teacher's class token on a labelled set during training (dinov2-eval's maths)."""

    knn_every_n_steps: int = 0  # 0 disables it
    dataset: str = ""  # dinov2-eval data spec: mnist | a class-per-folder directory | images.npy
    labels: str = ""  # labels .npy for an images .npy
    val_fraction: float = 0.2
    img_size: Optional[int] = None  # default: crops.global_crops_size
    resize_ratio: float = 1.0
    ks: List[int] = field(default_factory=lambda: [20])
    limit: Optional[int] = None  # evaluate on a stratified subset of at most this many samples


@dataclass
class DistributedConfig:
    # How the processes were started: auto (reads which variables are set: torchrun's RANK/WORLD_SIZE/
    # MASTER_ADDR/MASTER_PORT, then SLURM_PROCID/SLURM_NTASKS with more than one task; logs its pick),
    # torchrun, slurm (srun tasks, one per GPU) or single (one process, no process group).
    launcher: str = "auto"
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    # Rendezvous and every collective: a dead or stuck rank fails the job after this long.
    timeout_minutes: float = 30.0
    # slurm launcher only: MASTER_PORT if set, else this, else 20000 + SLURM_JOB_ID % 40000.
    master_port: Optional[int] = None
    # HSDP: replicate over this many groups and shard within each (1 = plain FSDP over all ranks).
    replicate_degree: int = 1
    reshard_after_forward: bool = True  # student only; the teacher (no backward) always reshards
    param_dtype: str = "fp32"  # FSDP2 MixedPrecisionPolicy: fp32 | bf16 | fp16
    reduce_dtype: str = "fp32"  # gradient reduce-scatter dtype: fp32 | bf16 | fp16


@dataclass
class SSLConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
