"""The typed training configuration: every key, its type, default and valid values, in one place.

The single source of defaults: a recipe (configs/train/*.yaml) overrides only what it changes.

Names follow the official DINOv2 configs (``student``, ``teacher``, ``dino``, ``ibot``, ``crops``,
``optim``, ``train``) so recipes port unchanged; sections the official code lacks (``data``,
``compute``, ``checkpoint``, ``logging``, ``evaluation``, ``distributed``) are ours.
Schedules are in epochs of ``train.OFFICIAL_EPOCH_LENGTH`` steps, as in the official recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .choices import ActivationCheckpointing, Arch, AttentionBackend, Centering, DistBackend, FfnLayer, Launcher, Precision, ScalingRule
from .ranges import ranged

# Valid values sit next to each numeric key: ``ranged(default, gt=0)`` (see ranges.py), checked at load
# time by the loader; a None default means null is also valid. Closed sets of strings are enums (choices.py).
PROBABILITY = dict(ge=0.0, le=1.0)
SCALE_PAIR = dict(gt=0.0, le=1.0, length=2, ordered=True)  # [min, max] fractions of the image area


@dataclass
class StudentConfig:
    arch: Arch = Arch.vit_large
    patch_size: int = ranged(14, ge=1)
    drop_path_rate: float = ranged(0.3, ge=0.0, lt=1.0)
    drop_path_uniform: bool = True
    layerscale: float = ranged(1.0e-5, ge=0.0)  # LayerScale init value; 0 = no LayerScale
    ffn_layer: FfnLayer = FfnLayer.mlp
    block_chunks: int = ranged(0, ge=0)
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = ranged(0, ge=0)
    interpolate_antialias: bool = False
    interpolate_offset: float = ranged(0.1, ge=0.0, lt=1.0)
    in_chans: int = ranged(3, ge=1)
    attention_backend: AttentionBackend = AttentionBackend.auto
    pretrained_weights: str = ""
    # Overrides of the architecture's width/depth, for small experiments (null = the arch's own).
    embed_dim: Optional[int] = ranged(None, ge=1)
    depth: Optional[int] = ranged(None, ge=1)
    num_heads: Optional[int] = ranged(None, ge=1)


@dataclass
class TeacherConfig:
    momentum_teacher: float = ranged(0.992, **PROBABILITY)
    final_momentum_teacher: float = ranged(1.0, **PROBABILITY)
    warmup_teacher_temp: float = ranged(0.04, gt=0.0)
    teacher_temp: float = ranged(0.07, gt=0.0)
    warmup_teacher_temp_epochs: int = ranged(30, ge=0)


@dataclass
class DinoConfig:
    loss_weight: float = ranged(1.0, ge=0.0)
    head_n_prototypes: int = ranged(65536, ge=1)
    head_bottleneck_dim: int = ranged(256, ge=1)
    head_nlayers: int = ranged(3, ge=1)
    head_hidden_dim: int = ranged(2048, ge=1)
    koleo_loss_weight: float = ranged(0.1, ge=0.0)


@dataclass
class IbotConfig:
    loss_weight: float = ranged(1.0, ge=0.0)
    mask_sample_probability: float = ranged(0.5, **PROBABILITY)
    mask_ratio_min_max: List[float] = ranged([0.1, 0.5], **PROBABILITY, length=2, ordered=True)
    separate_head: bool = False
    head_n_prototypes: int = ranged(65536, ge=1)
    head_bottleneck_dim: int = ranged(256, ge=1)
    head_nlayers: int = ranged(3, ge=1)
    head_hidden_dim: int = ranged(2048, ge=1)


@dataclass
class CropsConfig:
    global_crops_scale: List[float] = ranged([0.32, 1.0], **SCALE_PAIR)
    local_crops_number: int = ranged(8, ge=0)  # 0 trains on the two global crops only
    local_crops_scale: List[float] = ranged([0.05, 0.32], **SCALE_PAIR)
    global_crops_size: int = ranged(224, ge=1)
    local_crops_size: int = ranged(98, ge=1)
    flip_p: float = ranged(0.5, **PROBABILITY)
    # brightness, contrast, saturation, hue (torchvision ColorJitter; the loader also checks hue <= 0.5)
    color_jitter: List[float] = ranged([0.4, 0.4, 0.2, 0.1], ge=0.0, length=4)
    color_jitter_p: float = ranged(0.8, **PROBABILITY)
    grayscale_p: float = ranged(0.2, **PROBABILITY)
    blur_p: List[float] = ranged([1.0, 0.1, 0.5], **PROBABILITY, length=3)  # global 1, global 2, local
    solarize_p: float = ranged(0.2, **PROBABILITY)
    # Per-channel normalisation of pixels in [0, 1]; one value per student.in_chans.
    mean: List[float] = ranged([0.485, 0.456, 0.406], **PROBABILITY, min_length=1)
    std: List[float] = ranged([0.229, 0.224, 0.225], gt=0.0, min_length=1)


@dataclass
class OptimConfig:
    epochs: int = ranged(100, ge=1)
    weight_decay: float = ranged(0.04, ge=0.0)
    weight_decay_end: float = ranged(0.4, ge=0.0)
    base_lr: float = ranged(0.004, gt=0.0)
    warmup_epochs: int = ranged(10, ge=0)  # at most optim.epochs
    min_lr: float = ranged(1.0e-6, ge=0.0)
    clip_grad: float = ranged(3.0, ge=0.0)  # max gradient norm per module; 0 = no clipping
    freeze_last_layer_epochs: int = ranged(1, ge=0)
    scaling_rule: ScalingRule = ScalingRule.sqrt_wrt_1024
    patch_embed_lr_mult: float = ranged(0.2, ge=0.0)
    layerwise_decay: float = ranged(0.9, gt=0.0, le=1.0)
    adamw_beta1: float = ranged(0.9, ge=0.0, lt=1.0)
    adamw_beta2: float = ranged(0.999, ge=0.0, lt=1.0)


@dataclass
class TrainConfig:
    batch_size_per_gpu: int = ranged(64, ge=1)
    OFFICIAL_EPOCH_LENGTH: int = ranged(1250, ge=1)
    centering: Centering = Centering.centering
    seed: int = ranged(0, ge=0)
    max_nonfinite_steps: int = ranged(10, ge=0)  # stop after this many skipped non-finite steps
    max_steps: Optional[int] = ranged(None, ge=1)  # stop early (e.g. a demo); schedules still span optim.epochs
    # When set, batch_size_per_gpu is derived as global_batch_size / (world size * grad_accum_steps)
    # (an error if that does not divide), so one recipe keeps its global batch on any world size.
    global_batch_size: Optional[int] = ranged(None, ge=1)


@dataclass
class DataConfig:
    # mnist_demo | folder:PATH | manifest:PATH | npy:PATH
    dataset: str = "mnist_demo"
    num_workers: int = ranged(2, ge=0)


@dataclass
class ComputeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.fp32
    grad_accum_steps: int = ranged(1, ge=1)
    compile: bool = False  # torch.compile each transformer block (student and teacher)
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none  # student blocks
    # Build the model on the meta device and initialise it on compute.device after sharding (same
    # weights as a plain build from the same seed on CPU); off = build on the CPU and copy.
    meta_init: bool = True
    fused_optimizer: bool = True  # fused AdamW where the device supports it
    # CPU threads of the training process (torch.set_num_threads); None keeps torch's default.
    # On a small CPU leave a core to each data worker: oversubscribed cores slow both down.
    num_threads: Optional[int] = ranged(None, ge=1)


@dataclass
class CheckpointConfig:
    every_n_steps: int = ranged(1000, ge=1)
    keep_last: int = ranged(3, ge=1)
    # Stage the state to CPU and write it in a background thread (dcp.async_save) while training
    # goes on; the checkpoint appears (atomically) when the write completes.
    async_save: bool = False


@dataclass
class LoggingConfig:
    # Losses and collapse monitors are computed every step; writing them costs one host sync,
    # so the GPU recipes write every 10 steps.
    every_n_steps: int = ranged(1, ge=1)
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class EvaluationConfig:
    """kNN of the teacher's class token on a labelled set during training (dinov2-eval's maths)."""

    knn_every_n_steps: int = ranged(0, ge=0)  # 0 disables it
    dataset: str = ""  # dinov2-eval data spec: mnist | a class-per-folder directory | images.npy
    labels: str = ""  # labels .npy for an images .npy
    val_fraction: float = ranged(0.2, gt=0.0, lt=1.0)
    img_size: Optional[int] = ranged(None, ge=1)  # default: crops.global_crops_size
    resize_ratio: float = ranged(1.0, ge=1.0)  # resize to img_size * resize_ratio, center-crop img_size
    ks: List[int] = ranged([20], ge=1, min_length=1)
    limit: Optional[int] = ranged(None, ge=1)  # evaluate on a stratified subset of at most this many samples


@dataclass
class DistributedConfig:
    # How the processes were started: auto (reads which variables are set: torchrun's RANK/WORLD_SIZE/
    # MASTER_ADDR/MASTER_PORT, then SLURM_PROCID/SLURM_NTASKS with more than one task; logs its pick),
    # torchrun, slurm (srun tasks, one per GPU) or single (one process, no process group).
    launcher: Launcher = Launcher.auto
    backend: DistBackend = DistBackend.auto  # auto: nccl on CUDA, gloo on CPU
    # Rendezvous and every collective: a dead or stuck rank fails the job after this long.
    timeout_minutes: float = ranged(30.0, gt=0.0)
    # slurm launcher only: MASTER_PORT if set, else this, else 20000 + SLURM_JOB_ID % 40000.
    master_port: Optional[int] = ranged(None, ge=1, le=65535)
    # HSDP: replicate over this many groups and shard within each (1 = plain FSDP over all ranks).
    replicate_degree: int = ranged(1, ge=1)
    reshard_after_forward: bool = True  # student only; the teacher (no backward) always reshards
    param_dtype: Precision = Precision.fp32  # FSDP2 MixedPrecisionPolicy
    reduce_dtype: Precision = Precision.fp32  # gradient reduce-scatter dtype


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
