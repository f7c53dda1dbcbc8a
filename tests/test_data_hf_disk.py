"""`data.dataset='hf-disk:DIR'`: a folder written by Hugging Face `datasets`' save_to_disk is a
file dataset like the others: the same records as the same rows in JSONL, a DatasetDict's own
splits, ClassLabel ids read as names in the dataset's own id order (tags too), and clear errors
for what is not such a folder."""

from __future__ import annotations

import json

import pytest

from lmflax.data import files
from lmflax.data.sources import DataError

from .test_data_files import config, records, sentiment_rows, write_jsonl

datasets = pytest.importorskip("datasets")


def _jsonl_twin(tmp_path, rows, name="r.jsonl"):
    return write_jsonl(tmp_path / name, rows)


def test_a_saved_dataset_gives_the_records_of_jsonl(tmp_path):
    rows = sentiment_rows(60, 0)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    common = {"data.text_key": "sentence"}
    a = config(
        "sst2", tmp_path / "d", **{"data.dataset": f"hf-disk:{tmp_path / 'saved'}", **common}
    )
    b = config(
        "sst2", tmp_path / "d", **{"data.dataset": f"jsonl:{_jsonl_twin(tmp_path, rows)}", **common}
    )
    for split in ("train", "validation"):  # one Dataset: validation carved as for one file
        assert records(a, split) == records(b, split)
        assert records(a, split)


def test_a_dataset_dict_keeps_its_splits_and_class_label_order(tmp_path):
    """ClassLabel(names=['positive', 'negative']) keeps id 0 = 'positive' (the dataset's order,
    not the sorted one a name column would get), and the DatasetDict's splits are used whole."""
    names = ["positive", "negative"]
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    train, valid = sentiment_rows(40, 1), sentiment_rows(12, 2)
    as_ids = lambda rs: [{**r, "label": names.index(r["label"])} for r in rs]  # noqa: E731
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(as_ids(train), features=features),
            "validation": datasets.Dataset.from_list(as_ids(valid), features=features),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    cfg = config(
        "sst2",
        tmp_path / "d",
        **{"data.dataset": f"hf-disk:{tmp_path / 'dd'}", "data.text_key": "sentence"},
    )
    got = records(cfg, "validation")
    assert len(got) == 12 and len(records(cfg, "train")) == 40
    assert [names[int(r["label"])] for r in got] == [r["label"] for r in valid]
    assert [r["sentence"].decode() for r in got] == [r["sentence"] for r in valid]
    # The same rows as JSONL with label_names in the ClassLabel's order: the same records.
    twin = config(
        "sst2",
        tmp_path / "d",
        **{
            "data.dataset": f"jsonl:train={_jsonl_twin(tmp_path, train, 't.jsonl')},"
            f"validation={_jsonl_twin(tmp_path, valid, 'v.jsonl')}",
            "data.text_key": "sentence",
            "data.label_names": ("positive", "negative"),
        },
    )
    assert records(twin, "validation") == got


def test_tags_as_a_sequence_of_class_labels(tmp_path):
    tags = ["O", "B-PER", "I-PER", "B-LOC"]
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=tags)),
        }
    )
    rows = [
        {"tokens": ["John", "Smith", "in", "Paris"], "ner_tags": [1, 2, 0, 3]},
        {"tokens": ["Paris"], "ner_tags": [3]},
    ] * 10
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "ner"))
    cfg = config(
        "conll2003",
        tmp_path / "d",
        **{
            "data.dataset": f"hf-disk:{tmp_path / 'ner'}",
            "data.text_key": "tokens",
            "data.label_key": "ner_tags",
            "data.validation_fraction": 0.0,
        },
    )
    got = records(cfg, "train")
    assert sorted(list(map(int, r["ner_tags"])) for r in got) == sorted(r["ner_tags"] for r in rows)
    info = files.builder(cfg.data.dataset, cfg.data.data_dir).info
    assert info.features["ner_tags"].feature.names == tags


def test_what_is_not_a_saved_dataset_is_named(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("hi\n")
    for path, message in (
        (tmp_path / "missing", "no such directory"),
        (tmp_path / "plain", "neither dataset_dict.json nor state.json"),
    ):
        cfg = config("sst2", tmp_path / "d", **{"data.dataset": f"hf-disk:{path}"})
        with pytest.raises(DataError, match=message):
            records(cfg, "train")
    datasets.Dataset.from_list([{"text": "a", "label": 0}] * 4).save_to_disk(
        str(tmp_path / "other")
    )
    cfg = config(
        "sst2",
        tmp_path / "d",
        **{"data.dataset": f"hf-disk:{tmp_path / 'other'}", "data.text_key": "sentence"},
    )
    with pytest.raises(
        DataError, match=r"no column 'sentence'; its columns are \['text', 'label'\]"
    ):
        records(cfg, "train")
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    cfg = config("sst2", tmp_path / "d", **{"data.dataset": f"hf-disk:{tmp_path / 'dd'}"})
    with pytest.raises(DataError, match="none named 'train'"):
        records(cfg, "train")


def test_hf_disk_without_a_folder_is_a_config_error():
    from lmflax.config import DataConfig

    assert any(
        "names no file after 'hf-disk:'" in e for e in DataConfig(dataset="hf-disk:").validate()
    )
    assert files.is_file_dataset("hf-disk:/x")
