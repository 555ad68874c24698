"""The typed training configuration: every key, its type, default and valid values, in one place.

The single source of defaults: a recipe (configs/train/*.yaml) overrides only what it changes.

Names follow the official DINOv2 configs (``student``, ``teacher``, ``dino``, ``ibot``, ``crops``,
``optim``, ``train``) so recipes port unchanged; sections the official code lacks (``data``,
``compute``, ``checkpoint``, ``logging``, ``evaluation``, ``distributed``) are ours.
Schedules are in epochs of ``train.OFFICIAL_EPOCH_LENGTH`` steps, as in the official recipes
(``auto``: one pass over the data, see dinov2/train/run_plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from dinov2.normalization import IMAGENET_MEAN, IMAGENET_STD

from .choices import (
    ActivationCheckpointing, Arch, AttentionBackend, Centering, CropPipeline, DistBackend, DistillationHeads, FfnLayer,
    Launcher, Precision, ScalingRule,
)
from .ranges import option, ranged

# Valid values sit next to each numeric key: ``ranged(default, gt=0, doc=...)`` (see ranges.py), checked at
# load time by the loader; a None default means null is also valid. Closed sets of strings are enums
# (choices.py). Every key carries its one-line description (``doc``), shown by dinov2-train --print-config.
PROBABILITY = dict(ge=0.0, le=1.0)
SCALE_PAIR = dict(gt=0.0, le=1.0, length=2, ordered=True)  # [min, max] fractions of the image area


@dataclass
class StudentConfig:
    arch: Arch = option(
        Arch.vit_large,
        doc="ViT size: vit_small 384/12/6, vit_base 768/12/12, vit_large 1024/24/16, vit_giant2 1536/40/24",
    )
    patch_size: int = ranged(14, ge=1, doc="patch side in pixels (crop sizes must be multiples of it)")
    drop_path_rate: float = ranged(0.3, ge=0.0, lt=1.0, doc="stochastic depth rate of the student")
    drop_path_uniform: bool = option(True, doc="the same drop-path rate in every block (else rising with depth)")
    layerscale: float = ranged(
        1.0e-5, ge=0.0, doc="LayerScale init value; 0 = no LayerScale (small models learn faster with ~0.1)")
    ffn_layer: FfnLayer = option(FfnLayer.mlp, doc="feed-forward block: mlp, swiglu / swiglufused (ViT-g) or identity")
    block_chunks: int = ranged(
        0, ge=0, doc="FSDP: shard the blocks as this many units of consecutive blocks (must divide depth; 0 = one "
        "unit per block; torch < 2.14: always per block); state-dict keys stay flat (blocks.{i})")
    qkv_bias: bool = option(True, doc="bias in the attention qkv projection")
    proj_bias: bool = option(True, doc="bias in the attention output projection")
    ffn_bias: bool = option(True, doc="biases in the feed-forward block")
    num_register_tokens: int = ranged(0, ge=0, doc="register tokens (4 in the _reg released models)")
    interpolate_antialias: bool = option(False, doc="antialiased bicubic resampling of position embeddings")
    interpolate_offset: float = ranged(
        0.1, ge=0.0, lt=1.0, doc="offset of the position-embedding resampling (official: 0.1; _reg models 0.0)")
    in_chans: int = ranged(3, ge=1, doc="input channels (1 grayscale, 3 RGB, more for npy multi-band arrays)")
    attention_backend: AttentionBackend = option(
        AttentionBackend.auto, doc="attention kernel: auto picks the fastest that works here")
    pretrained_weights: str = option(
        "", doc="start the student from these backbone weights (a file, or LVD142M for the released ones)")
    embed_dim: Optional[int] = ranged(
        None, ge=1, doc="override the arch's width, for small experiments (null = the arch's own)")
    depth: Optional[int] = ranged(None, ge=1, doc="override the arch's number of blocks (null = the arch's own)")
    num_heads: Optional[int] = ranged(None, ge=1, doc="override the arch's attention heads (null = the arch's own)")


@dataclass
class TeacherConfig:
    momentum_teacher: float = ranged(
        0.992, **PROBABILITY, doc="EMA momentum of the teacher at step 0 (cosine to the final value)")
    final_momentum_teacher: float = ranged(1.0, **PROBABILITY, doc="EMA momentum of the teacher at the last step")
    warmup_teacher_temp: float = ranged(0.04, gt=0.0, doc="teacher softmax temperature at step 0")
    teacher_temp: float = ranged(0.07, gt=0.0, doc="teacher softmax temperature after the warmup")
    warmup_teacher_temp_epochs: int = ranged(30, ge=0, doc="epochs of the linear teacher-temperature warmup")


@dataclass
class DinoConfig:
    loss_weight: float = ranged(1.0, ge=0.0, doc="weight of the DINO (class token) loss; 0 = off")
    head_n_prototypes: int = ranged(65536, ge=1, doc="prototypes K of the DINO head (teacher entropy is at most ln K)")
    head_bottleneck_dim: int = ranged(256, ge=1, doc="bottleneck width of the DINO head")
    head_nlayers: int = ranged(3, ge=1, doc="MLP layers of the DINO head")
    head_hidden_dim: int = ranged(2048, ge=1, doc="hidden width of the DINO head")
    koleo_loss_weight: float = ranged(0.1, ge=0.0, doc="weight of the KoLeo spreading regulariser; 0 = off")


@dataclass
class IbotConfig:
    loss_weight: float = ranged(1.0, ge=0.0, doc="weight of the iBOT masked-patch loss; 0 = off")
    mask_sample_probability: float = ranged(0.5, **PROBABILITY, doc="fraction of global crops that get a mask")
    mask_ratio_min_max: List[float] = ranged(
        [0.1, 0.5], **PROBABILITY, length=2, ordered=True, doc="[min, max] fraction of patches masked in a masked crop")
    separate_head: bool = option(False, doc="a head of its own for iBOT (else the DINO head is shared)")
    head_n_prototypes: int = ranged(65536, ge=1, doc="prototypes of the iBOT head (separate_head only)")
    head_bottleneck_dim: int = ranged(256, ge=1, doc="bottleneck width of the iBOT head")
    head_nlayers: int = ranged(3, ge=1, doc="MLP layers of the iBOT head")
    head_hidden_dim: int = ranged(2048, ge=1, doc="hidden width of the iBOT head")


@dataclass
class CropsConfig:
    global_crops_scale: List[float] = ranged(
        [0.32, 1.0], **SCALE_PAIR, doc="[min, max] area fraction of the 2 global crops")
    local_crops_number: int = ranged(8, ge=0, doc="local crops per image; 0 trains on the two global crops only")
    local_crops_scale: List[float] = ranged(
        [0.05, 0.32], **SCALE_PAIR, doc="[min, max] area fraction of the local crops")
    global_crops_size: int = ranged(224, ge=1, doc="side of the global crops in pixels (the training resolution)")
    local_crops_size: int = ranged(98, ge=1, doc="side of the local crops in pixels")
    flip_p: float = ranged(0.5, **PROBABILITY, doc="probability of a horizontal flip")
    rotation_degrees: float = ranged(
        0.0, ge=0.0, le=180.0,
        doc="random rotation of each crop in [-d, d] degrees, corners black (0 = off, as the official recipe)")
    color_jitter: List[float] = ranged(
        [0.4, 0.4, 0.2, 0.1], ge=0.0, length=4,
        doc="brightness, contrast, saturation, hue of torchvision ColorJitter (hue <= 0.5)",
    )
    color_jitter_p: float = ranged(0.8, **PROBABILITY, doc="probability of the color jitter")
    grayscale_p: float = ranged(0.2, **PROBABILITY, doc="probability of converting a crop to grayscale")
    blur_p: List[float] = ranged(
        [1.0, 0.1, 0.5], **PROBABILITY, length=3,
        doc="Gaussian blur probability: global crop 1, global crop 2, local crops",
    )
    solarize_p: float = ranged(0.2, **PROBABILITY, doc="probability of solarizing the second global crop")
    mean: List[float] = ranged(
        list(IMAGENET_MEAN), **PROBABILITY, min_length=1,
        doc="per-channel mean of pixels in [0, 1], one per student.in_chans",
    )
    std: List[float] = ranged(
        list(IMAGENET_STD), gt=0.0, min_length=1,
        doc="per-channel std of pixels in [0, 1], one per student.in_chans",
    )
    pipeline: CropPipeline = option(
        CropPipeline.fast, doc="fast (OpenCV + torch uint8, ~3x the images/s per core) | reference (torchvision/PIL)")


@dataclass
class OptimConfig:
    epochs: int = ranged(100, ge=1, doc="length of the run in epochs of train.OFFICIAL_EPOCH_LENGTH steps")
    weight_decay: float = ranged(0.04, ge=0.0, doc="AdamW weight decay at step 0 (cosine to weight_decay_end)")
    weight_decay_end: float = ranged(0.4, ge=0.0, doc="AdamW weight decay at the last step")
    base_lr: float = ranged(0.004, gt=0.0, doc="peak learning rate before batch scaling (see scaling_rule)")
    warmup_epochs: int = ranged(10, ge=0, doc="epochs of linear lr warmup (at most optim.epochs)")
    min_lr: float = ranged(1.0e-6, ge=0.0, doc="learning rate at the end of the cosine decay")
    clip_grad: float = ranged(3.0, ge=0.0, doc="max gradient norm per module; 0 = no clipping")
    freeze_last_layer_epochs: int = ranged(1, ge=0, doc="epochs with the heads' last layer frozen (lr 0)")
    scaling_rule: ScalingRule = option(
        ScalingRule.sqrt_wrt_1024, doc="lr = base_lr x sqrt(batch/1024), x batch/256, or unscaled")
    patch_embed_lr_mult: float = ranged(0.2, ge=0.0, doc="lr multiplier of the patch embedding")
    layerwise_decay: float = ranged(0.9, gt=0.0, le=1.0, doc="lr decay per block from the top (1 = none)")
    adamw_beta1: float = ranged(0.9, ge=0.0, lt=1.0, doc="AdamW beta1")
    adamw_beta2: float = ranged(0.999, ge=0.0, lt=1.0, doc="AdamW beta2")


@dataclass
class TrainConfig:
    batch_size_per_gpu: int = ranged(64, ge=1, doc="images per process per micro-batch")
    OFFICIAL_EPOCH_LENGTH: Union[int, str] = ranged(
        1250, ge=1, words=("auto",),
        doc="steps per epoch; auto = one pass over the data (ceil(images / global batch))")
    centering: Centering = option(
        Centering.centering, doc="teacher centering: running-mean centering or sinkhorn_knopp")
    seed: int = ranged(0, ge=0, doc="seed of weights, crops, masks and data order")
    max_nonfinite_steps: int = ranged(10, ge=0, doc="stop after this many skipped non-finite steps")
    max_steps: Optional[int] = ranged(
        None, ge=1, doc="stop early after this many steps; schedules still span optim.epochs")
    # batch_size_per_gpu is then derived as global_batch_size / (world size * grad_accum_steps)
    # (an error if that does not divide), so one recipe keeps its global batch on any world size.
    global_batch_size: Optional[int] = ranged(
        None, ge=1, doc="images per optimizer step over all processes (null: batch_size_per_gpu x world x accum)")
    # A run directory or a checkpoint directory: student, teacher, heads and loss centers are loaded (position
    # embeddings resampled to this run's grid); optimizer, step and data position start afresh. A checkpoint of
    # this run's own output directory takes precedence (a requeued job resumes). See dinov2/train/init_from.py.
    init_from: str = option(
        "", doc="start from another run's model (RUN_DIR or a checkpoint dir), fresh optimizer and step counter")
    freeze_backbone_steps: int = ranged(
        0, ge=0, doc="head warm-up: the first steps train only the heads (backbone frozen; teacher follows by EMA)")


@dataclass
class HighResConfig:
    """The last ``steps`` steps at a higher resolution (DINOv2: the final 10k iterations at 518 px); the
    schedules continue by step through the phase (see dinov2/train/phases.py)."""

    steps: int = ranged(0, ge=0, doc="final steps trained at the high resolution (0 = no high-resolution phase)")
    global_crops_size: int = ranged(518, ge=1, doc="side of the global crops in the phase (a multiple of the patch)")
    local_crops_size: Optional[int] = ranged(
        None, ge=1, doc="side of the local crops in the phase (null = crops.local_crops_size)")
    batch_size_per_gpu: Optional[int] = ranged(
        None, ge=1, doc="images per process per micro-batch in the phase (null = train's; memory grows with size^2)")


@dataclass
class DataConfig:
    dataset: str = option(
        "mnist_demo", doc="training images: mnist[:train] | folder:PATH | manifest:PATH | npy:PATH (data/spec.py)")
    num_workers: int = ranged(
        -1, ge=-1, doc="data-loading worker processes per rank (0 = in the training process; -1 = the CPU cores "
                       "this process may use, shared by the LOCAL_WORLD_SIZE ranks of the machine, less one)")
    prefetch_factor: int = ranged(4, ge=1, doc="batches each worker prepares ahead (with num_workers > 0)")


@dataclass
class ComputeConfig:
    device: str = option("auto", doc="auto | cpu | cuda | cuda:N")
    precision: Precision = option(
        Precision.fp32, doc="autocast precision: fp32, bf16 (GPU), fp16 (GPU, with grad scaling)")
    grad_accum_steps: int = ranged(1, ge=1, doc="micro-batches per optimizer step")
    compile: bool = option(False, doc="torch.compile each transformer block (student and teacher)")
    activation_checkpointing: ActivationCheckpointing = option(
        ActivationCheckpointing.none, doc="recompute student-block activations in backward: none, full, selective")
    # Same weights as a plain build from the same seed on CPU.
    meta_init: bool = option(
        True,
        doc="build on the meta device and initialise on compute.device after sharding (off: build on CPU and copy)",
    )
    fused_optimizer: bool = option(True, doc="fused AdamW where the device supports it")
    # On a small CPU leave a core to each data worker: oversubscribed cores slow both down.
    num_threads: Optional[int] = ranged(None, ge=1, doc="CPU threads of the training process (null = torch's default)")


@dataclass
class CheckpointConfig:
    every_n_steps: int = ranged(1000, ge=1, doc="write a checkpoint every this many steps (and at the end)")
    keep_last: int = ranged(3, ge=1, doc="checkpoints kept on disk")
    # The checkpoint appears (atomically) when the write completes.
    async_save: bool = option(
        False, doc="stage the state to CPU and write it in a background thread while training goes on")


@dataclass
class LoggingConfig:
    # Losses and collapse monitors are computed every step; writing them costs one host sync,
    # so the GPU recipes write every 10 steps.
    every_n_steps: int = ranged(1, ge=1, doc="write metrics (and check for collapse) every this many steps")
    tensorboard: bool = option(True, doc="also write TensorBoard events (RUN_DIR/tensorboard)")
    progress_bar: bool = option(True, doc="a tqdm progress bar on rank 0")
    collapse_warnings: bool = option(True, doc="warn when the monitors show a collapse (see README, healthy ranges)")
    plots: bool = option(True, doc="draw loss_curve.png (and knn_curve.png) in the run directory at the end")
    mlflow: bool = option(False, doc="also log to MLflow (when installed; MLFLOW_TRACKING_URI or ./mlruns)")
    wandb: bool = option(False, doc="also log to Weights & Biases (when installed; WANDB_MODE=offline works offline)")
    experiment: str = option("dinov2", doc="MLflow experiment / W&B project name")


@dataclass
class EvaluationConfig:
    """kNN of the teacher's class token on a labelled set during training (dinov2-eval's maths)."""

    knn_every_n_steps: int = ranged(0, ge=0, doc="kNN of the teacher every this many steps; 0 disables it")
    dataset: str = option("", doc="labelled set: mnist[:train] | folder:PATH (a sub-folder per class) | npy:PATH")
    labels: str = option("", doc="labels .npy for an images .npy")
    # Given: `dataset` is the kNN memory bank as it is; not given: `dataset` is split.
    val_dataset: str = option("", doc="labelled kNN queries, same grammar (e.g. mnist:held_out); empty = split dataset")
    val_labels: str = option("", doc="labels .npy for a val_dataset .npy")
    val_fraction: float = ranged(0.2, gt=0.0, lt=1.0, doc="stratified fraction of dataset held out as kNN queries")
    # Its own seed, not train.seed: a seed study then changes the training, never the test set.
    split_seed: int = ranged(0, ge=0, doc="seed of that split (and of limit's subset), as dinov2-eval --split-seed")
    img_size: Optional[int] = ranged(None, ge=1, doc="evaluation image size (null = crops.global_crops_size)")
    resize_ratio: float = ranged(1.0, ge=1.0, doc="resize to img_size x resize_ratio, then center-crop img_size")
    ks: List[int] = ranged([20], ge=1, min_length=1, doc="neighbour counts k of the kNN classifier")
    limit: Optional[int] = ranged(None, ge=1, doc="evaluate on a stratified subset of at most this many samples")


@dataclass
class DistributedConfig:
    # auto reads which variables are set: torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, then
    # SLURM_PROCID/SLURM_NTASKS with more than one task; logs its pick.
    launcher: Launcher = option(
        Launcher.auto, doc="how the processes were started: auto, torchrun, slurm (srun tasks) or single")
    backend: DistBackend = option(DistBackend.auto, doc="process-group backend: auto = nccl on CUDA, gloo on CPU")
    timeout_minutes: float = ranged(
        30.0, gt=0.0, doc="rendezvous and collective timeout: a dead or stuck rank fails the job after this")
    master_port: Optional[int] = ranged(
        None, ge=1, le=65535, doc="slurm launcher: MASTER_PORT if set, else this, else 20000 + job id % 40000")
    replicate_degree: int = ranged(
        1, ge=1, doc="HSDP: replicate over this many groups, shard within each (1 = plain FSDP)")
    reshard_after_forward: bool = option(
        True, doc="free the student's gathered weights after forward (the teacher always does)")
    param_dtype: Precision = option(Precision.fp32, doc="FSDP2 MixedPrecisionPolicy parameter dtype")
    reduce_dtype: Precision = option(Precision.fp32, doc="gradient reduce-scatter dtype")


@dataclass
class DistillationConfig:
    """Distillation of a frozen teacher into the student (dinov2/train/distillation.py): no teacher EMA, no
    masking, no stochastic depth, iBOT on every patch of both global crops, a student EMA as the final model."""

    teacher: str = option(
        "", doc="frozen teacher: a run directory of ours, an exported backbone file, or a hub name ('' = off)")
    teacher_weights: str = option("LVD142M", doc="weights of a hub-name teacher: LVD142M, a file or a URL")
    heads: DistillationHeads = option(
        DistillationHeads.auto, doc="teacher heads: auto (a run's own, else kmeans), trained, kmeans, random")
    kmeans_images: int = ranged(4096, ge=1, doc="training images whose teacher features fit the k-means heads")
    kmeans_iterations: int = ranged(20, ge=1, doc="k-means iterations of the teacher heads")


@dataclass
class SSLConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    high_res: HighResConfig = field(default_factory=HighResConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
