"""lmflax.vectors: file formats (round trips, gensim interop, malformed lines), Embed
initialisation, and queries against answers worked out by hand."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmflax import cli
from lmflax import vectors as vec


def _random_vectors(n: int = 50, dim: int = 7, seed: int = 0) -> vec.WordVectors:
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((n, dim)).astype(np.float32)
    table[0, 0] = np.float32(1e-30)  # extremes survive the text format too
    table[1, 1] = np.float32(-3.4e38)
    table[2, 2] = np.float32(0.1)
    words = [f"w{i}" for i in range(n - 3)] + ["naïve", "日本", "don't"]
    return vec.WordVectors(words, table)


@pytest.mark.parametrize(
    "binary, header", [(False, True), (False, False), (True, True)], ids=["w2v", "glove", "bin"]
)
def test_write_then_read_gives_the_same_vectors(tmp_path, binary, header):
    wv = _random_vectors()
    path = tmp_path / ("v.bin" if binary else "v.txt")
    vec.write_vectors(path, wv, binary=binary, header=header)
    back = vec.read_vectors(path)
    assert back.words == wv.words
    np.testing.assert_array_equal(back.vectors, wv.vectors)  # bit for bit


def test_read_then_write_handwritten_files(tmp_path):
    """A C-tool text file (trailing spaces), a GloVe file (no header, a word with a space) and
    their rewrites hold the same words and float32 values."""
    c_tool = "3 4\nthe 0.1 -0.2 0.3 0.4 \nof 1 2 3 4 \n</s> -1e-3 2.5e2 0 -0 \n"
    glove = "the 0.1 -0.2 0.3 0.4\n. . . 1 2 3 4\nof 5 6 7 8\n"
    for name, text in (("c.txt", c_tool), ("g.txt", glove)):
        src = tmp_path / name
        src.write_text(text)
        first = vec.read_vectors(src)
        want = [line.rstrip().rsplit(" ", 4) for line in text.splitlines() if line.count(" ") > 2]
        assert first.words == [w[0] for w in want]
        np.testing.assert_array_equal(
            first.vectors, np.array([[float(x) for x in w[1:]] for w in want], np.float32)
        )
        glove = name == "g.txt"
        for binary in (False, True):
            out = tmp_path / f"out-{name}.{'bin' if binary else 'txt'}"
            if glove:  # '. . .' fits GloVe's format only: word2vec words end at a space
                with pytest.raises(ValueError, match=r"word 1 \('. . .'\).*only the GloVe"):
                    vec.write_vectors(out, first, binary=binary)
                if binary:
                    continue
            vec.write_vectors(out, first, binary=binary, header=not glove)
            again = vec.read_vectors(out)
            assert again.words == first.words
            np.testing.assert_array_equal(again.vectors, first.vectors)


def test_gensim_reads_ours_and_we_read_gensims(tmp_path):
    from gensim.models import KeyedVectors

    wv = _random_vectors()
    for binary in (False, True):
        ours = tmp_path / f"ours.{'bin' if binary else 'txt'}"
        vec.write_vectors(ours, wv, binary=binary)
        kv = KeyedVectors.load_word2vec_format(str(ours), binary=binary)
        assert list(kv.index_to_key) == wv.words
        np.testing.assert_array_equal(kv.vectors, wv.vectors)
        theirs = tmp_path / f"theirs.{'bin' if binary else 'txt'}"
        kv.save_word2vec_format(str(theirs), binary=binary)
        back = vec.read_vectors(theirs)
        assert back.words == wv.words
        if binary:
            np.testing.assert_array_equal(back.vectors, wv.vectors)
        else:  # gensim writes 6 decimals
            np.testing.assert_allclose(back.vectors, wv.vectors, atol=5e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("3 2\na 1 2\nb 1\nc 1 2\n", r"line 3: expected a word and 2 numbers"),
        ("a 1 2\nb 1 2\nc 1 2\nd 1 zwei\n", r"line 4: 'zwei' is not a number"),
        ("2 2\na 1 2\nb 1 2\nc 3 4\n", r"header announces 2 vectors but the file holds 3"),
        ("a 1 2\n\nb 1 2 3 x\n", r"line 3: 'x' is not a number"),
        ("2 2\na 1 2\nb 1 2 3\n", r"line 3: expected a word and 2 numbers, got 3"),
    ],
)
def test_malformed_text_line_reports_its_number(tmp_path, text, pattern):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(vec.VectorFileError, match=pattern):
        vec.read_vectors(path)


def test_malformed_binary_entry_is_named(tmp_path):
    path = tmp_path / "v.bin"
    vec.write_vectors(path, _random_vectors(n=5, dim=3), binary=True)
    data = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-10])
    with pytest.raises(vec.VectorFileError, match=r"entry 5 of 5 \(.don't.*expected 12 bytes"):
        vec.read_vectors(tmp_path / "cut.bin")
    (tmp_path / "nohead.bin").write_bytes(b"oops\n" + data)
    with pytest.raises(vec.VectorFileError, match=r"line 1: a binary word2vec file starts"):
        vec.read_vectors(tmp_path / "nohead.bin")


def test_unwritable_word_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"word 1 \('a\\nb'\) cannot be written"):
        vec.write_vectors(tmp_path / "x.txt", vec.WordVectors(["ok", "a\nb"], np.ones((2, 2))))


def test_pretrained_embed_rows_missing_words_and_export(tmp_path, caplog):
    rng = np.random.default_rng(1)
    file_words = [f"w{i}" for i in range(400)]
    wv = vec.WordVectors(file_words, rng.normal(0.0, 0.5, (400, 16)).astype(np.float32))
    vocab = ["<pad>", "W3", "w7", *[f"new{i}" for i in range(300)], "w399"]
    with caplog.at_level(logging.WARNING, logger="lmflax.vectors"):
        pe = vec.pretrained_embed(wv, vocab, seed=3)
    assert pe.found == 3 and len(pe.missing) == 301
    assert "301 of 304 vocabulary words are not in the pretrained vectors" in caplog.text
    table = pe.table
    np.testing.assert_array_equal(table[1], wv["w3"])  # case-insensitive fallback
    np.testing.assert_array_equal(table[2], wv["w7"])
    np.testing.assert_array_equal(table[-1], wv["w399"])
    # Missing rows: N(0, σ²) with the file's σ (documented), here 0.5 ± sampling noise.
    assert abs(table[3:-1].std() - wv.vectors.std()) < 0.03
    assert abs(table[3:-1].mean()) < 0.03
    # The Embed initialises to that table and looks rows up.
    ids = jnp.array([[1, 2, 303]])
    variables = jax.jit(pe.embed.init)(jax.random.key(0), ids)
    np.testing.assert_array_equal(vec.embed_table(variables), table)
    out = jax.jit(pe.embed.apply)(pe.variables, ids)
    np.testing.assert_array_equal(np.asarray(out[0]), table[[1, 2, 303]])
    # Export and read back.
    path = vec.export_embed(tmp_path / "e.txt", pe.words, variables)
    back = vec.read_vectors(path)
    assert back.words == vocab
    np.testing.assert_array_equal(back.vectors, table)
    zeros = vec.pretrained_embed(wv, ["w1", "zz"], missing_init="zeros", case_insensitive=False)
    np.testing.assert_array_equal(zeros.table[1], 0.0)


def test_pretrained_embed_from_the_file_vocabulary():
    wv = _random_vectors(n=10, dim=3)
    pe = vec.pretrained_embed(wv)
    assert pe.words == wv.words and pe.found == 10 and pe.missing == []
    np.testing.assert_array_equal(pe.table, wv.vectors)


def _toy() -> vec.WordVectors:
    # king = royal + male, queen = royal + female, man = male, woman = female (+ small noise).
    e = np.eye(4, dtype=np.float32)
    royal, male, female, other = e
    words = ["king", "queen", "man", "woman", "apple", "kingly"]
    table = np.stack(
        [
            royal + male,
            royal + female,
            male + 0.1 * royal,
            female + 0.1 * royal,
            other,
            royal + male + 0.01 * female,
        ]
    )
    return vec.WordVectors(words, table)


def test_nearest_and_analogy_exclude_the_query_words():
    wv = _toy()
    near = vec.nearest(wv, "king", k=2)
    assert near[0][0] == "kingly" and near[0][1] == pytest.approx(0.99995, abs=1e-4)
    assert "king" not in [w for w, _ in vec.nearest(wv, "king", k=5)]
    # man : king :: woman : ?  -> queen. The raw nearest to king - man + woman is 'king' itself
    # (or 'kingly'); both are excluded (king as a query word) or lose to queen.
    answer = vec.analogy(wv, "man", "king", "woman", k=1)
    assert answer[0][0] == "queen"
    assert "man" not in [w for w, _ in vec.analogy(wv, "man", "king", "woman", k=5)]
    with pytest.raises(KeyError, match=r"'prince' is not among the 6 words"):
        vec.nearest(wv, "prince")


def test_similarity_spearman_against_hand_ranks(tmp_path):
    # Cosines: (king, kingly) ~1 > (king, queen) 0.5 > (man, woman) ~0.02 > (king, apple) 0.
    # Human scores rank (man, woman) above (king, queen): one swap among n=4 pairs, so
    # rho = 1 - 6·Σd² / (n(n²-1)) = 1 - 6·2/60 = 0.8.
    path = tmp_path / "sim.tsv"
    path.write_text(
        "# comment\nWord 1\tWord 2\tHuman (mean)\nking\tkingly\t9\nking\tqueen\t5\n"
        "man\twoman\t6\nking\tapple\t0.5\nking\tunicorn\t3\n"
    )
    r = vec.evaluate_similarity(_toy(), path)
    assert r.pairs == 4 and r.oov == 1
    assert r.spearman == pytest.approx(0.8)
    (tmp_path / "bad.tsv").write_text("a\tb\t1\nc\td\tmuch\n")
    with pytest.raises(vec.VectorFileError, match=r"line 2: score 'much' is not a number"):
        vec.evaluate_similarity(_toy(), tmp_path / "bad.tsv")


def test_analogy_file_accuracy_sections_and_errors(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text(
        ": royalty\nman king woman queen\nMan King Woman Queen\n"
        ": fruit\nman king woman apple\nman king prince queen\n"
    )
    r = vec.evaluate_analogies(_toy(), path)
    assert (r.correct, r.total, r.oov) == (2, 3, 1)
    assert r.sections == {"royalty": (2, 2), "fruit": (0, 1)}
    assert r.accuracy == pytest.approx(2 / 3)
    (tmp_path / "bad.txt").write_text(": s\na b c d\na b c\n")
    with pytest.raises(vec.VectorFileError, match=r"line 3: an analogy is four words"):
        vec.evaluate_analogies(_toy(), tmp_path / "bad.txt")


def test_cli_neighbors_and_evaluate(tmp_path, capsys):
    path = tmp_path / "toy.txt"
    vec.write_vectors(path, _toy())
    assert cli.main(["vectors", "neighbors", str(path), "king", "man:king::woman", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "king: kingly" in out and "man:king::woman: queen" in out
    (tmp_path / "q.txt").write_text("man king woman queen\n")
    assert cli.main(["vectors", "evaluate", str(path), "--analogies", str(tmp_path / "q.txt")]) == 0
    assert "accuracy 1.0000 (1/1, 0 skipped)" in capsys.readouterr().out
    assert cli.main(["vectors", "neighbors", str(tmp_path / "nope.txt"), "x"]) == 1
    assert "does not exist" in capsys.readouterr().err
