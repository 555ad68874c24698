"""Nothing we load runs code: weights files from a URL, a file:// URL or a path (through torch.hub,
the hub entry points, dinov2-eval's backbone resolution and student.pretrained_weights), and DCP
checkpoints (``.metadata`` and non-tensor items). A crafted file is refused with an error naming
it, and the marker its payload would write never appears. Also: one rule for non-floating
tensors, and the released name LVD142M resolving for the trainer exactly as on the hub."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

import hubconf
from crafted import class_tampering_pickle, write_crafted_metadata, write_crafted_pth
from dinov2.checkpoint.metadata import (
    ALLOWED_GLOBALS, CheckpointReadError, SafeFileSystemReader, UnsafeCheckpointError, checkpoint_failure,
    read_metadata, safe_load,
)
from dinov2.configs import load_config
from dinov2.eval.backbone import BackboneError, resolve_backbone
from dinov2.hub.weights import WeightsFileError, load_state_dict_from, resolve_backbone_weights
from dinov2.train.ssl_meta_arch import SSLMetaArch, build_backbone

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP without a process group
REPO = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=28, depth=2)
# A tiny trainer config (patch 14 so that released names apply; heads small).
TRAIN = [
    "student.arch=vit_small", "student.depth=1", "student.patch_size=14", "crops.global_crops_size=28",
    "crops.local_crops_size=14", "dino.head_n_prototypes=16", "dino.head_hidden_dim=16",
    "dino.head_bottleneck_dim=8", "ibot.head_n_prototypes=16", "ibot.head_hidden_dim=16",
    "ibot.head_bottleneck_dim=8",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A directory served by ``python -m http.server`` on 127.0.0.1 (a subprocess, loopback only)."""
    root = tmp_path_factory.mktemp("served")
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                               "--directory", str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        port = int(line.split(" port ")[1].split()[0])
        yield root, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty torch hub cache for this test (downloads land in it, not in ~/.cache). Restored as it
    was: unset, so that later tests' TORCH_HOME is honoured again (set_dir(previous) would pin it)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"


@pytest.fixture
def crafted(served, tmp_path):
    """A crafted .pth, served and on disk, and the marker its payload would write."""
    root, base = served
    marker = tmp_path / "marker"
    name = f"crafted_{tmp_path.name}.pth"
    write_crafted_pth(root / name, marker)
    return root / name, f"{base}/{name}", marker


def test_the_crafted_file_runs_code_when_loaded_unsafely(crafted, tmp_path):
    path, _, marker = crafted
    unsafe = tmp_path / "unsafe_marker"
    write_crafted_pth(tmp_path / "unsafe.pth", unsafe)
    torch.load(tmp_path / "unsafe.pth", weights_only=False)  # what the old URL path did
    assert unsafe.read_text() == "ran" and not marker.exists()


def test_crafted_url_is_refused_by_torch_hub_load(crafted, hub_cache):
    path, url, marker = crafted
    downloaded = hub_cache / path.name  # where torch.hub's download machinery puts it
    message = rf"{url} \(downloaded to {downloaded}\): refused to load: .*it names exec.*weights_only=True"
    with pytest.raises(WeightsFileError, match=message):
        torch.hub.load(str(REPO), "dinov2_vits14", source="local", weights=url, **SMALL)
    assert not marker.exists()
    assert not downloaded.exists()  # a refused download does not stay in the cache


def test_crafted_url_is_refused_by_every_project_path(crafted, hub_cache):
    _, url, marker = crafted
    with pytest.raises(WeightsFileError, match="refused to load"):
        load_state_dict_from(url)
    with pytest.raises(BackboneError, match="refused to load"):  # dinov2-eval --backbone NAME --weights URL
        resolve_backbone(name="dinov2_vits14", weights=url, img_size=28)
    with pytest.raises(WeightsFileError, match="refused to load"):
        SSLMetaArch(load_config(None, TRAIN + [f"student.pretrained_weights={url}"]))
    assert not marker.exists()


@pytest.mark.parametrize("form", ["path", "file_url"])
def test_crafted_local_file_is_refused(crafted, form):
    path, _, marker = crafted
    weights = path.as_uri() if form == "file_url" else str(path)
    with pytest.raises(WeightsFileError, match=f"{path.name}: refused to load"):
        hubconf.dinov2_vits14(weights=weights, **SMALL)
    with pytest.raises(BackboneError, match="refused to load"):  # dinov2-eval --backbone-file
        resolve_backbone(backbone_file=weights, arch="vit_small")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_genuine_weights_from_a_url_load_and_are_cached(served, hub_cache, suffix):
    root, base = served
    torch.manual_seed(0)
    source = hubconf.dinov2_vits14(pretrained=False, **SMALL).eval()
    name = f"genuine{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, root / name) if suffix == ".safetensors" else torch.save(state, root / name)
    model = torch.hub.load(str(REPO), "dinov2_vits14", source="local", weights=f"{base}/{name}", **SMALL).eval()
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(model(x), source(x))
    assert (hub_cache / name).is_file()


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_truncated_weights_file_is_a_clear_error(tmp_path, name):
    state = {k: v.contiguous() for k, v in hubconf.dinov2_vits14(pretrained=False, **SMALL).state_dict().items()}
    save_file(state, tmp_path / name) if name.endswith(".safetensors") else torch.save(state, tmp_path / name)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match=rf"{name}: not a readable (torch weights|\.safetensors) file"):
        hubconf.dinov2_vits14(weights=str(tmp_path / name), **SMALL)


def test_non_floating_tensors_are_one_clear_error_everywhere(tmp_path):
    state = {k: v.contiguous() for k, v in hubconf.dinov2_vits14(pretrained=False, **SMALL).state_dict().items()}
    state["pos_embed"] = state["pos_embed"].to(torch.int32)
    save_file(state, tmp_path / "int.safetensors")
    message = r"int.safetensors: weights must be floating-point tensors, found pos_embed \(torch.int32\)"
    with pytest.raises(WeightsFileError, match=message):  # the hub used to cast silently
        hubconf.dinov2_vits14(weights=str(tmp_path / "int.safetensors"), **SMALL)
    with pytest.raises(BackboneError, match=message):  # dinov2-eval used to crash with a traceback
        resolve_backbone(backbone_file=str(tmp_path / "int.safetensors"), arch="vit_small")
    cfg = load_config(None, TRAIN + [f"student.pretrained_weights={tmp_path / 'int.safetensors'}"])
    with pytest.raises(WeightsFileError, match=message):
        SSLMetaArch(cfg)


# ---------------------------------------------------------------- the released name for training


def test_released_name_resolves_like_the_hub():
    base = "https://dl.fbaipublicfiles.com/dinov2"
    assert resolve_backbone_weights("LVD142M", "vit_small", 14) == f"{base}/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert resolve_backbone_weights("LVD142M", "vit_large", 14, 4) == (
        f"{base}/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth")
    assert resolve_backbone_weights("LVD142M", "vit_giant2", 14) == f"{base}/dinov2_vitg14/dinov2_vitg14_pretrain.pth"
    with pytest.raises(ValueError, match="no released LVD142M weights for vit_small with patch size 7"):
        resolve_backbone_weights("LVD142M", "vit_small", 7)
    with pytest.raises(ValueError, match="2 register tokens"):
        resolve_backbone_weights("LVD142M", "vit_base", 14, 2)


def test_student_pretrained_weights_released_name_and_local_file(tmp_path, hub_cache):
    cfg = load_config(None, TRAIN + ["student.pretrained_weights=LVD142M"])
    torch.manual_seed(1)
    released = build_backbone(cfg.student, cfg.crops.global_crops_size, with_drop_path=False).state_dict()
    # The released file, as a finished download in the hub cache: no network needed.
    hub_cache.mkdir(parents=True)
    torch.save(released, hub_cache / "dinov2_vits14_pretrain.pth")
    model = SSLMetaArch(cfg)
    for key, value in released.items():
        assert torch.equal(model.student.backbone.state_dict()[key], value), key
        assert torch.equal(model.teacher.backbone.state_dict()[key], value), key

    torch.save(released, tmp_path / "local.pth")
    local = SSLMetaArch(load_config(None, TRAIN + [f"student.pretrained_weights={tmp_path / 'local.pth'}"]))
    assert torch.equal(local.student.backbone.pos_embed, released["pos_embed"])
    with pytest.raises(ValueError, match="no released LVD142M weights for vit_small with patch size 7"):
        SSLMetaArch(load_config(None, TRAIN + ["student.pretrained_weights=LVD142M", "student.patch_size=7"]))


# ---------------------------------------------------------------- DCP checkpoints


@pytest.fixture
def checkpoint(tmp_path):
    """A real DCP checkpoint with tensors and non-tensor items (as our trainer writes)."""
    state = {"model": {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)},
             "progress": {"step": 7, "lrs": [0.1, 0.2], "name": "x", "flag": None}}
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    return tmp_path / "ckpt", state


def test_safe_reader_round_trip(checkpoint):
    path, saved = checkpoint
    metadata = read_metadata(path)
    assert metadata.state_dict_metadata["model.w"].size == torch.Size([3, 4])
    target = {"model": {"w": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.int64)},
              "progress": {"step": 0, "lrs": [0.0, 0.0], "name": "", "flag": 1}}
    dcp.load(target, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)
    assert torch.equal(target["model"]["w"], saved["model"]["w"])
    assert torch.equal(target["model"]["b"], saved["model"]["b"])
    assert target["progress"] == saved["progress"]


def test_crafted_metadata_is_refused_naming_the_file(checkpoint, tmp_path):
    path, _ = checkpoint
    marker = tmp_path / "marker"
    metadata_file = write_crafted_metadata(path, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"{metadata_file}: refused to unpickle builtins.exec"):
        read_metadata(path)
    with pytest.raises(UnsafeCheckpointError, match=rf"{metadata_file}: refused to unpickle builtins.exec"):
        safe_load({"model": {"w": torch.zeros(3, 4)}}, path, no_dist=True)
    reader = SafeFileSystemReader(str(path))
    with pytest.raises(BaseException):  # DCP itself re-wraps the refusal; the reader keeps it
        dcp.load({"model": {"w": torch.zeros(3, 4)}}, storage_reader=reader, no_dist=True)
    assert isinstance(reader.failure, UnsafeCheckpointError)
    assert not marker.exists()
    with open(metadata_file, "rb") as handle:  # the file does run code when unpickled as DCP does
        pickle.load(handle)
    assert marker.exists()


@pytest.mark.parametrize("module, name", [("torch.distributed.checkpoint.metadata", "Metadata"),
                                          ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
                                          ("pathlib", "PosixPath")])
def test_a_pickle_cannot_change_an_allowed_class(tmp_path, module, name):
    import importlib

    (tmp_path / ".metadata").write_bytes(class_tampering_pickle(module, name, "hijack"))
    with pytest.raises(UnsafeCheckpointError, match=f"tried to change the class.*{name}"):
        read_metadata(tmp_path)
    assert not hasattr(getattr(importlib.import_module(module), name), "hijack")  # undone


def test_truncated_metadata_is_a_clear_error(checkpoint):
    path, _ = checkpoint
    data = (path / ".metadata").read_bytes()
    (path / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match=r"\.metadata: not readable DCP checkpoint metadata \(truncated"):
        read_metadata(path)


def test_crafted_non_tensor_item_is_refused(tmp_path):
    from crafted import RunsCode

    marker = tmp_path / "marker"
    dcp.save({"w": torch.ones(2), "extra": RunsCode(marker)}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"\.distcp: refused to unpickle item 'extra' \(it names exec\)"):
        safe_load({"w": torch.zeros(2), "extra": None}, tmp_path / "ckpt", no_dist=True)
    with pytest.raises(BaseException) as caught:  # the same through dcp.load: DCP wraps it
        dcp.load({"w": torch.zeros(2), "extra": None}, storage_reader=SafeFileSystemReader(str(tmp_path / "ckpt")),
                 no_dist=True)
    assert isinstance(checkpoint_failure(caught.value), UnsafeCheckpointError)
    assert not marker.exists()
    dcp.load({"w": torch.zeros(2), "extra": None}, storage_reader=dcp.FileSystemReader(str(tmp_path / "ckpt")),
             no_dist=True)
    assert marker.exists()  # DCP's own reader runs it: the reason for SafeFileSystemReader


def test_allow_list_is_what_real_metadata_names(checkpoint):
    """Every global a real metadata pickle names is allowed (recorded by an unpickler that only watches)."""
    path, _ = checkpoint
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with open(path / ".metadata", "rb") as handle:
        Recorder(handle).load()
    assert seen and seen <= ALLOWED_GLOBALS, seen - ALLOWED_GLOBALS
