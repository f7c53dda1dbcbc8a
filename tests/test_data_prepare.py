"""`lmflax data prepare`: a TFDS builder run to array_record without TensorFlow, from local
files, readable by lmflax's data sources; a builder that needs TensorFlow is refused up front."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pytest
import tensorflow_datasets as tfds

from lmflax import cli
from lmflax.data import sources

LINES = [f"line {i}: the quick brown fox" for i in range(30)]


class LmflaxTestLocalLines(tfds.core.GeneratorBasedBuilder):
    """Lines of text files a user downloaded by hand (train.txt, test.txt in manual_dir)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "test"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "put train.txt and test.txt in manual_dir"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        root = Path(dl_manager.manual_dir)
        return {
            "train": self._generate_examples(root / "train.txt"),
            "test": self._generate_examples(root / "test.txt"),
        }

    def _generate_examples(self, path: Path):
        for i, line in enumerate(path.read_text().splitlines()):
            yield i, {"text": line}


def _manual(tmp_path: Path) -> Path:
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "train.txt").write_text("\n".join(LINES[:24]) + "\n")
    (manual / "test.txt").write_text("\n".join(LINES[24:]) + "\n")
    return manual


def test_prepare_writes_array_record_that_lmflax_reads(tmp_path, capsys):
    data_dir = tmp_path / "tfds"
    argv = ["data", "prepare", "lmflax_test_local_lines", f"--data_dir={data_dir}"]
    assert cli.main([*argv, f"--manual_dir={_manual(tmp_path)}"]) == 0
    out = capsys.readouterr().out
    assert "--config.data.dataset=lmflax_test_local_lines" in out
    files = list((data_dir / "lmflax_test_local_lines" / "1.0.0").glob("*.array_record*"))
    assert files, "no ArrayRecord files written"
    train = sources.data_source("lmflax_test_local_lines", "train", str(data_dir))
    test = sources.data_source("lmflax_test_local_lines", "test", str(data_dir))
    texts = sorted(train[i]["text"].decode() for i in range(len(train)))
    assert texts == sorted(LINES[:24]) and len(test) == 6
    # Prepared already: a second call does nothing and says where it is.
    assert cli.main(argv) == 0 and "prepared lmflax_test_local_lines" in capsys.readouterr().out


def test_prepare_of_an_unknown_name_is_exit_2_with_suggestions(tmp_path, capsys):
    assert cli.main(["data", "prepare", "lm1bb", f"--data_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "'lm1bb' is not a dataset TFDS knows" in err and "lm1b" in err


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed here"
)
def test_a_builder_that_needs_tensorflow_is_refused_before_downloading(
    tmp_path, monkeypatch, capsys
):
    """lm1b's builder reads its download with tf.io.gfile: without TensorFlow, say what to
    install before anything is downloaded (the builder here counts download calls)."""
    package = tmp_path / "lmflax_test_tf_pkg"  # TFDS builders must live in a package
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "builder.py"
    # (The import line is put together so that this test file itself does not look like a
    # builder module that imports TensorFlow.)
    tf_import = "from tensorflow_datasets.core.utils.lazy_imports_utils import " + "tensorflow"
    module.write_text(
        tf_import
        + " as tf\n"
        + textwrap.dedent(
            """
            import tensorflow_datasets as tfds

            DOWNLOADS = []

            class LmflaxTestNeedsTf(tfds.core.GeneratorBasedBuilder):
                VERSION = tfds.core.Version("1.0.0")
                RELEASE_NOTES = {"1.0.0": "test"}

                def _info(self):
                    return self.dataset_info_from_configs(
                        features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
                    )

                def _split_generators(self, dl_manager):
                    DOWNLOADS.append(1)
                    return {"train": self._generate_examples(tf.io.gfile.glob("/nonexistent/*"))}

                def _generate_examples(self, files):
                    yield 0, {"text": "x"}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("lmflax_test_tf_pkg.builder")
    try:
        rc = cli.main(["data", "prepare", "lmflax_test_needs_tf", f"--data_dir={tmp_path}/tfds"])
        err = capsys.readouterr().err
        assert rc == 1 and "needs TensorFlow" in err and "pip install tensorflow-cpu" in err
        assert mod.DOWNLOADS == []
    finally:
        sys.modules.pop("lmflax_test_tf_pkg.builder", None)
        sys.modules.pop("lmflax_test_tf_pkg", None)


def test_an_unprepared_dataset_is_not_said_to_be_prepared(tmp_path):
    """TFDS's own message claims 'already prepared at DIR in the TFRECORD format' for a
    directory that does not exist; lmflax's names the command that prepares it."""
    with pytest.raises(sources.DatasetNotAvailableError) as e:
        sources.data_source("lm1b", "train", str(tmp_path))
    message = str(e.value)
    assert "already prepared" not in message and "is not prepared under" in message
    assert f"lmflax data prepare lm1b --data_dir={tmp_path}" in message
    assert not (tmp_path / "lm1b" / "1.1.0").exists() or not any(
        (tmp_path / "lm1b" / "1.1.0").iterdir()
    )
