"""The tiny training config shared by the trainer tests (CPU, seconds per run)."""

TINY = [
    "student.arch=vit_small", "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
    "student.patch_size=7", "student.in_chans=1", "student.drop_path_rate=0.2", "student.layerscale=0.1",
    "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=2",
    "crops.mean=[0.13]", "crops.std=[0.31]", "crops.color_jitter_p=0.0", "crops.grayscale_p=0.0",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
    "train.batch_size_per_gpu=8", "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=2", "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1", "optim.freeze_last_layer_epochs=0", "data.num_workers=0",
    "logging.every_n_steps=1", "logging.tensorboard=false", "logging.progress_bar=false",
    "checkpoint.every_n_steps=3", "compute.fused_optimizer=false",
]
