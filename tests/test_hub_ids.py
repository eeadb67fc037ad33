"""Hub ids (``hf-hub:ORG/NAME[@REVISION]``) resolved from a Hugging Face cache built on disk.

huggingface_hub reads ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported,
so each check runs in a fresh process with them set. Nothing touches the
network: offline, or an endpoint on a closed loopback port.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models._hub import save_for_hf

import jaxvit
from jaxvit.checkpoints import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(hub_cache: Path, repo: str, folder: Path, refs: dict[str, str]) -> None:
    """``folder``'s files as huggingface_hub caches them: blobs, a snapshot of links, refs."""
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref, commit in refs.items():
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """``(HF_HOME, the peer)``: a cache holding ``org/tiny-vit`` at ``main`` and tag ``v1``."""
    torch.manual_seed(0)
    peer = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
    )
    peer = peer.eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    home = tmp_path_factory.mktemp("hf_home")
    folder = home / "saved"
    save_for_hf(peer, str(folder), safe_serialization=True)
    _cache_repo(home / "hub", "org/tiny-vit", folder, {"main": COMMIT, "v1": COMMIT})
    return home, peer


SCRIPT = """
import json, sys
import numpy as np
import jaxvit
from jaxvit import predict
out = {}
bundle = jaxvit.load_for_inference("hf-hub:org/tiny-vit")
x = np.asarray(json.loads(sys.argv[1]), np.float32)
out["logits"] = np.asarray(bundle.model.apply({"params": bundle.params}, x)).tolist()
out["tag"] = jaxvit.load_for_inference("hf-hub:org/tiny-vit@v1").image_size
params = jaxvit.load_pretrained("hf-hub:org/tiny-vit@%s" % sys.argv[2], bundle.model, 32)
out["same"] = bool(np.array_equal(params["head"]["classifier"]["kernel"], bundle.params["head"]["classifier"]["kernel"]))
for hub_id in sys.argv[3:]:
    try:
        jaxvit.load_for_inference(hub_id)
        out[hub_id] = "loaded"
    except (FileNotFoundError, ValueError) as e:
        out[hub_id] = str(e)
out["predict"] = predict.main(["--checkpoint", "hf-hub:org/tiny-vit", "--json", sys.argv[0]])
from jaxvit.training import configs
config = configs.base_config()
config.init_from, config.num_classes = "hf-hub:org/tiny-vit", 5
model, _ = configs.model_from_init_checkpoint(config)  # init_from, as train.py reads it
out["init_from"] = [model.width, model.num_classes]
print("RESULT" + json.dumps(out))
"""


def _run(home: Path, offline: str, *args: str, image: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": offline, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_CACHE", None)
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a closed port: no request leaves the machine
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("sys.argv[0]", repr(str(image))), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_a_hub_id_loads_from_the_offline_cache(hub_home, tmp_path):
    home, peer = hub_home
    image = tmp_path / "cat.png"
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(image)
    x = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
    missing = ["hf-hub:org/missing", "hf-hub:org/tiny-vit@v9", "hf-hub:not a repo"]
    out = _run(home, "1", json.dumps(x.tolist()), COMMIT, *missing, image=image)
    with torch.no_grad():
        theirs = peer(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    ours = np.asarray(out["logits"])
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
    assert out["tag"] == [32, 32] and out["same"] and out["predict"] == 0 and out["init_from"] == [32, 5]
    assert out["hf-hub:org/missing"] == "hf-hub:org/missing: not in the local cache and HF_HUB_OFFLINE is set"
    assert out["hf-hub:org/tiny-vit@v9"].startswith("hf-hub:org/tiny-vit@v9: not in the local cache")
    assert out["hf-hub:not a repo"].startswith("'hf-hub:not a repo' is not a hub id")


def test_without_a_network_a_missing_repo_is_one_line_naming_it(hub_home, tmp_path):
    home, _ = hub_home
    image = tmp_path / "cat.png"
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(image)
    x = np.zeros((1, 32, 32, 3), np.float32)
    out = _run(home, "0", json.dumps(x.tolist()), "main", "hf-hub:org/elsewhere", image=image)
    assert (
        out["hf-hub:org/elsewhere"]
        == "hf-hub:org/elsewhere: not in the local cache and the Hub cannot be reached"
    )
    assert out["predict"] == 0  # the cached repository still loads


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("hf-hub:timm/vit_base_patch16_224.augreg_in21k", ("timm/vit_base_patch16_224.augreg_in21k", None)),
        ("hf-hub:facebook/dinov2-small@refs/pr/1", ("facebook/dinov2-small", "refs/pr/1")),
    ],
)
def test_hub_ids_parse(text, parsed):
    assert hub.is_hub_id(text) and hub.parse(text) == parsed


@pytest.mark.parametrize("text", ["hf-hub:", "hf-hub:org", "hf-hub:../x/y", "hf-hub:a/b/c", "hf-hub:a/b@"])
def test_malformed_hub_ids_are_refused(text):
    with pytest.raises(ValueError, match="is not a hub id"):
        hub.parse(text)
    assert not hub.is_hub_id(Path(text))  # a path object is never a hub id


def test_a_plain_path_is_not_fetched(tmp_path):
    assert hub.resolve(tmp_path / "x.npz") == tmp_path / "x.npz"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxvit.load_for_inference(tmp_path / "hf-hub:org" / "name")
