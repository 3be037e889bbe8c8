"""Per-node archives: each party's archive holds exactly its holdings; a node given its archive loads the same
shard (images, labels, order) as the in-memory split; wrong archives are one-line errors."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from common.config import load_config
from common.data import CIFAR10_NORMALIZATION, DataError, ImageArrays, Normalization
from common.holdings import decide_holdings, load_experiment_data
from common.node_data import holdings_sha256, load_node_archive, write_node_archive
from edge_client.shard import clear_cache, load_shard, shard_from_archive
from server.server_data import from_node_data
from simulations.cli import main as cli_main

TINY = {"data.name": "tiny", "data.tiny_per_class": 12, "data.train_per_class": None, "data.test_per_class": None,
        "split.pipc": 2, "split.validation_per_class": 1, "split.num_clients": 3, "seed": 4}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    out = tmp_path_factory.mktemp("nodes")
    args = [f"{k}={'null' if v is None else v}" for k, v in TINY.items()]
    assert cli_main(["partition", "--config", "quickstart", "--out", str(out), *args]) == 0
    return out, load_config("quickstart", TINY)


def test_each_archive_holds_exactly_its_party_and_the_manifest_says_so(nodes):
    out, cfg = nodes
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["archives"]) == {"client-0", "client-1", "client-2", "public", "test"}
    dataset = load_experiment_data(cfg)
    holdings = decide_holdings(cfg, dataset.train.labels)
    for entry in manifest["archives"].values():
        path = out / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        node = load_node_archive(path)
        assert sum(entry["train_per_class"]) == len(node.train) and sum(entry["test_per_class"]) == len(node.test)
    public = load_node_archive(out / "public.tar.gz")
    np.testing.assert_array_equal(public.train.images, dataset.train.images[holdings.public])
    test = load_node_archive(out / "test.tar.gz")
    np.testing.assert_array_equal(test.test.images, dataset.test.images)
    with tarfile.open(out / "client-1.tar.gz") as tar:  # a client archive holds nothing but its own slices
        names = [m.name for m in tar if m.isfile() and m.name != "holding.json"]
    train_idx, holdout_idx = holdings.client(1)
    assert sorted(int(n.rsplit("/", 1)[1][:-4]) for n in names) == sorted([*train_idx, *holdout_idx])


def test_a_node_with_its_archive_loads_the_same_shard_as_the_in_memory_split(nodes):
    out, cfg = nodes
    for k in range(3):
        clear_cache()
        memory = load_shard(cfg, k)
        clear_cache()
        own = load_shard(cfg, k, out / f"client-{k}.tar.gz")
        for field in ("train_images", "train_labels", "holdout_images", "holdout_labels"):
            np.testing.assert_array_equal(getattr(own, field), getattr(memory, field))


def test_every_node_normalises_with_the_full_training_splits_statistics(nodes, tmp_path):
    out, cfg = nodes
    full = load_experiment_data(cfg).normalization
    assert full == Normalization.of(load_experiment_data(cfg).train.images) != CIFAR10_NORMALIZATION
    assert Normalization.from_json(json.loads((out / "manifest.json").read_text())["normalization"]) == full
    clear_cache()
    shard = load_shard(cfg, 1, out / "client-1.tar.gz")
    assert shard.normalization == full != Normalization.of(shard.train_images)  # not its own slice's statistics
    assert from_node_data(cfg, out).normalization == full
    images = ImageArrays(np.zeros((1, 4, 4, 3), np.uint8), np.array([0]))
    write_node_archive(tmp_path / "old.tar.gz", "client", ("a", "b"), full, (images, np.array([0])),
                       (images, np.array([1])), {})
    with tarfile.open(tmp_path / "old.tar.gz") as tar:  # as an older partition wrote it: no normalization
        files = {m.name: tar.extractfile(m).read() for m in tar}
    holding = json.loads(files["holding.json"])
    del holding["normalization"]
    files["holding.json"] = json.dumps(holding).encode()
    with tarfile.open(tmp_path / "old.tar.gz", "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match="records no normalization .* run feddistill partition again"):
        load_node_archive(tmp_path / "old.tar.gz")


def test_wrong_archives_are_one_line_errors(nodes, tmp_path):
    out, cfg = nodes
    with pytest.raises(DataError, match="not of client 2"):
        shard_from_archive(cfg, 2, out / "client-0.tar.gz")
    other = load_config("quickstart", {**TINY, "seed": 5})  # another split seed: other holdings
    with pytest.raises(DataError, match="another data/split config"):
        shard_from_archive(other, 0, out / "client-0.tar.gz")
    cifar = load_config("quickstart", {"split.num_clients": 3})
    images = ImageArrays(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]))
    write_node_archive(tmp_path / "odd.tar.gz", "client", ("cat", "dog"), CIFAR10_NORMALIZATION,
                       (images, np.array([0, 1])), (images, np.array([2, 3])),
                       {"holdings_sha256": holdings_sha256(cifar), "partition_id": 0})
    with pytest.raises(DataError, match="differ from the configured dataset's"):
        shard_from_archive(cifar, 0, tmp_path / "odd.tar.gz")
    (tmp_path / "broken.tar.gz").write_bytes((out / "client-0.tar.gz").read_bytes()[:200])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_node_archive(tmp_path / "broken.tar.gz")


def test_the_server_from_its_archives_holds_what_the_in_memory_split_gives_it(nodes, tmp_path):
    from server.server_data import from_dataset, from_node_data

    out, cfg = nodes
    server_dir = tmp_path / "server"  # only what the server may hold: no client archive
    server_dir.mkdir()
    for name in ("manifest.json", "public.tar.gz", "test.tar.gz"):
        (server_dir / name).write_bytes((out / name).read_bytes())
    own, memory = from_node_data(cfg, server_dir), from_dataset(cfg)
    assert own.classes == memory.classes and own.slice_sizes == memory.slice_sizes
    for part in ("public", "test"):
        np.testing.assert_array_equal(getattr(own, part).images, getattr(memory, part).images)
        np.testing.assert_array_equal(getattr(own, part).labels, getattr(memory, part).labels)
    tampered = bytearray((out / "public.tar.gz").read_bytes())
    tampered[-20] ^= 0xFF
    (server_dir / "public.tar.gz").write_bytes(bytes(tampered))
    with pytest.raises(DataError, match=r"sha256 \S+ differs from manifest.json's"):
        from_node_data(cfg, server_dir)
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="another data/split config"):
        from_node_data(load_config("quickstart", {**TINY, "seed": 5}), out)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_writes_each_clients_label_distribution_for_every_partitioner(tmp_path, scheme):
    overrides = {**TINY, "split.partition": scheme, "split.min_partition_size": 1, "split.classes_per_client": 8}
    args = [f"{k}={'null' if v is None else v}" for k, v in overrides.items()]
    assert cli_main(["partition", "--config", "quickstart", "--out", str(tmp_path), *args]) == 0
    cfg = load_config("quickstart", overrides)
    dataset = load_experiment_data(cfg)
    holdings = decide_holdings(cfg, dataset.train.labels)
    distribution = json.loads((tmp_path / "label_distribution.json").read_text())
    assert distribution["partition"]["scheme"] == scheme
    for k, client in enumerate(distribution["clients"]):
        train, held = holdings.client(k)
        assert client["train"] == np.bincount(dataset.train.labels[train], minlength=10).tolist()
        assert client["held_out"] == np.bincount(dataset.train.labels[held], minlength=10).tolist()
    assert distribution["public"] == np.bincount(dataset.train.labels[holdings.public], minlength=10).tolist()
    assert (tmp_path / "label_distribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def _members(archive) -> list[tuple[str, bytes]]:
    with tarfile.open(archive, "r:gz") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.reliability
def test_a_decompression_bomb_is_refused_before_it_is_unpacked(tmp_path, reliability):
    from common.data import MAX_EXPANSION, MAX_MEMBER_BYTES

    bomb = _tar(tmp_path / "bomb.tar.gz", [("holding.json", b"{}"), ("train/a/0.png", bytes(200 * 2**20))])
    assert bomb.stat().st_size < 2**20  # 200 MiB of zeros compress to ~200 kB
    with pytest.raises(DataError, match="beyond the limits") as err:
        load_node_archive(bomb)
    assert str(MAX_MEMBER_BYTES) in str(err.value) and f"{MAX_EXPANSION}x" in str(err.value)
    many = _tar(tmp_path / "many.tar.gz", [("holding.json", b"{}")] + [(f"train/a/{i}.png", bytes(8 * 2**20)) for i in range(12)])
    with pytest.raises(DataError, match="beyond the limits"):  # each member small, the total is not
        load_node_archive(many)
    reliability("Loading safety", "a node archive that unpacks to 200 MiB from ~200 kB (and one of many 8 MiB members)",
                f"refused on the declared sizes before unpacking: `{str(err.value)[:160]}...`")


@pytest.mark.reliability
def test_a_repeated_member_name_is_refused(nodes, tmp_path, reliability):
    out, _ = nodes
    members = _members(out / "client-0.tar.gz")
    name, _ = members[1]
    twice = _tar(tmp_path / "twice.tar.gz", [*members, (name, members[2][1])])  # a second copy that would win
    with pytest.raises(DataError, match="appears twice") as err:
        load_node_archive(twice)
    reliability("Loading safety", "a node archive with a repeated member name", f"refused: `{err.value}`")


HOLDINGS = [
    ("holding.json that is a list", lambda h: [1, 2], "is not a feddistill-holding/1 description"),
    ("classes that are not names", lambda h: {**h, "classes": [1, 2]}, "'classes' must be a non-empty list"),
    ("train names that are not paths", lambda h: {**h, "train": [3]}, "'train' must be a list"),
    ("a negative partition id", lambda h: {**h, "partition_id": -1}, "'partition_id' must be null"),
    ("normalization std 0", lambda h: {**h, "normalization": {"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}}, "has an entry <= 0"),
    ("normalization of text", lambda h: {**h, "normalization": {"mean": "a", "std": "b"}}, "normalization: must be"),
    ("deeply nested holding.json", lambda h: "[" * 100_000 + "]" * 100_000, "no readable holding.json"),
]


@pytest.mark.reliability
@pytest.mark.parametrize("kind, change, words", HOLDINGS, ids=[h[0] for h in HOLDINGS])
def test_a_malformed_holding_json_is_a_one_line_error(kind, change, words, nodes, tmp_path, reliability):
    out, _ = nodes
    members = _members(out / "client-0.tar.gz")
    holding = change(json.loads(members[0][1]))
    text = holding if isinstance(holding, str) else json.dumps(holding)
    archive = _tar(tmp_path / "bad.tar.gz", [("holding.json", text.encode()), *members[1:]])
    with pytest.raises(DataError, match=words) as err:
        load_node_archive(archive)
    assert "\n" not in str(err.value)
    reliability("Loading safety", f"a node archive with {kind}", f"refused: `{str(err.value)[:200]}`")


MANIFESTS = [
    ("a list", lambda m: [], "not an object with 'archives'"),
    ("no client-2", lambda m: {**m, "archives": {k: v for k, v in m["archives"].items() if k != "client-2"}}, "no 'client-2'"),
    ("a file path outside the folder",
     lambda m: {**m, "archives": {**m["archives"], "public": {**m["archives"]["public"], "file": "../x"}}},
     "'file' must be a file name"),
    ("counts that are text",
     lambda m: {**m, "archives": {**m["archives"], "client-0": {**m["archives"]["client-0"], "train_per_class": "9"}}},
     "'train_per_class' must be a list"),
]


@pytest.mark.reliability
@pytest.mark.parametrize("kind, change, words", MANIFESTS, ids=[m[0] for m in MANIFESTS])
def test_a_malformed_manifest_is_a_one_line_error(kind, change, words, nodes, tmp_path, reliability):
    out, cfg = nodes
    folder = tmp_path / "server"
    folder.mkdir()
    for name in ("public.tar.gz", "test.tar.gz"):
        (folder / name).write_bytes((out / name).read_bytes())
    (folder / "manifest.json").write_text(json.dumps(change(json.loads((out / "manifest.json").read_text()))))
    with pytest.raises(DataError, match=words) as err:
        from_node_data(cfg, folder)
    reliability("Loading safety", f"the server's manifest.json: {kind}", f"refused: `{err.value}`")


@pytest.mark.reliability
def test_a_node_checks_its_archive_against_the_manifests_sha256(nodes, reliability):
    out, cfg = nodes
    manifest = json.loads((out / "manifest.json").read_text())
    clear_cache()
    shard = shard_from_archive(cfg, 1, out / "client-1.tar.gz", manifest["archives"]["client-1"]["sha256"])
    assert len(shard.train_labels) > 0
    with pytest.raises(DataError, match="differs from node_config data-sha256's") as err:
        shard_from_archive(cfg, 0, out / "client-0.tar.gz", manifest["archives"]["client-1"]["sha256"])
    reliability("Loading safety", "a node given another archive than manifest.json's sha256 for it (node_config data-sha256)",
                f"refused: `{err.value}`")
