"""Tests for megatron_dsv3.data: tokenizer, built-in corpus, iteration and indexed data."""
import numpy
import pytest
import torch

from megatron_dsv3 import data as D


def test_tokenizer_round_trip_and_specials():
    tok = D.ByteTokenizer()
    text = "Grüße, naïve café — 東京 🙂\n"
    ids = tok.tokenize(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) > len(text)  # multi-byte chars
    assert tok.detokenize(ids) == text
    assert tok.detokenize([tok.eod] + ids + [tok.pad, tok.eod]) == text
    assert (tok.eod, tok.pad, tok.vocab_size) == (256, 257, 258)
    assert tok.vocab_size <= 512  # the tiny preset's vocab
    assert tok.detokenize([0xFF, ord("a")]) == "\ufffda"  # broken UTF-8 is replaced


def test_corpus_is_large_and_deterministic():
    corpus = D.builtin_corpus()
    assert len(corpus.encode("utf-8")) > 100_000
    assert corpus == D.builtin_corpus()
    assert "the" in corpus and "\n\n" in corpus


def test_token_dataset_label_shift():
    tokens = torch.arange(23)
    ds = D.TokenDataset(tokens, seq_length=5)
    assert len(ds) == 4  # (23 - 1) // 5
    for i in range(len(ds)):
        s = ds[i]
        assert s["tokens"].tolist() == list(range(5 * i, 5 * i + 5))
        assert torch.equal(s["labels"], s["tokens"] + 1)
        assert s["loss_mask"].dtype == torch.float and torch.all(s["loss_mask"] == 1)
        assert s["position_ids"].tolist() == list(range(5))
    with pytest.raises(IndexError):
        ds[4]


def test_builtin_datasets_disjoint_and_decodable():
    train, valid = D.builtin_datasets(64, valid_fraction=0.05)
    assert len(train) > 10 * len(valid) > 0
    # Train is the head and valid the tail of the document stream: no token position is shared.
    tok = D.ByteTokenizer()
    stream = [t for doc in D.builtin_documents() for t in tok.tokenize(doc) + [tok.eod]]
    n_train, n_valid = train.tokens.numel(), valid.tokens.numel()
    assert n_train + n_valid == len(stream) > 100_000
    assert train.tokens.tolist() == stream[:n_train] and valid.tokens.tolist() == stream[n_train:]
    assert abs(n_valid / len(stream) - 0.05) < 1e-3
    assert 64 * len(train) + 1 <= n_train  # train samples read only train tokens
    assert valid[0]["tokens"].tolist() == stream[n_train:n_train + 64]
    text = D.ByteTokenizer().detokenize(train[0]["tokens"])
    assert text and text in D.builtin_corpus()
    assert int((train.tokens == D.ByteTokenizer.eod).sum()) > 10  # documents separated by eod


def test_builtin_datasets_seq_length_too_long():
    with pytest.raises(ValueError, match="--seq-length"):
        D.builtin_datasets(10_000_000)


def _toy():
    return D.TokenDataset(torch.arange(10 * 4 + 1), seq_length=4)  # 10 samples, id = first token / 4


def _ids(batch):
    return (batch["tokens"][:, 0] // 4).tolist()


def test_iterator_deterministic_and_reshuffles_per_epoch():
    a = D.SampleIterator(_toy(), 2, seed=3)
    b = D.SampleIterator(_toy(), 2, seed=3)
    sa = [_ids(next(a)) for _ in range(15)]
    assert sa == [_ids(next(b)) for _ in range(15)]
    epoch0 = sum(sa[:5], [])
    epoch1 = sum(sa[5:10], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # a new permutation each epoch
    c = D.SampleIterator(_toy(), 2, seed=4)
    assert [_ids(next(c)) for _ in range(5)] != sa[:5]
    assert a.consumed_samples == 30
    batch = next(D.SampleIterator(_toy(), 3, seed=0))
    assert set(batch) >= {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].shape == (3, 4) and torch.equal(batch["labels"], batch["tokens"] + 1)


def test_iterator_dp_ranks_disjoint_and_covering():
    dp, mbs = 3, 2
    its = [D.SampleIterator(_toy(), mbs, seed=7, dp_rank=r, dp_size=dp) for r in range(dp)]
    single = D.SampleIterator(_toy(), mbs * dp, seed=7)
    seen = []
    for _ in range(5):  # 30 samples = 3 epochs of 10
        step = [_ids(next(it)) for it in its]
        flat = sum(step, [])
        assert flat == _ids(next(single))  # ranks split one global step, in rank order
        seen.extend(flat)
    for e in range(3):
        assert sorted(seen[10 * e: 10 * e + 10]) == list(range(10))
    assert all(it.consumed_samples == 30 for it in its)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_iterator_resume_matches_uninterrupted(dp_size):
    mbs, steps_before, steps_after = 3, 4, 6
    full = {r: D.SampleIterator(_toy(), mbs, seed=11, dp_rank=r, dp_size=dp_size) for r in range(dp_size)}
    for r in full:
        for _ in range(steps_before):
            next(full[r])
    consumed = full[0].consumed_samples
    assert consumed == steps_before * mbs * dp_size
    for r in range(dp_size):
        resumed = D.SampleIterator(_toy(), mbs, seed=11, dp_rank=r, dp_size=dp_size,
                                   consumed_samples=consumed)
        for _ in range(steps_after):
            x, y = next(full[r]), next(resumed)
            assert all(torch.equal(x[k], y[k]) for k in x)
        assert resumed.consumed_samples == full[r].consumed_samples


def test_indexed_missing_files(tmp_path):
    prefix = str(tmp_path / "corpus")
    with pytest.raises(ValueError, match=r"--data-path: .*corpus\.bin"):
        D.indexed_datasets(prefix, 32, 0, tokenizer=D.ByteTokenizer())
    open(prefix + ".bin", "wb").close()
    with pytest.raises(ValueError, match=r"--data-path: .*corpus\.idx"):
        D.indexed_datasets(prefix, 32, 0, tokenizer=D.ByteTokenizer())


def test_indexed_round_trip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = D.ByteTokenizer()
    prefix = str(tmp_path / "corpus")
    docs = D.builtin_documents()[:300]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for doc in docs:
        builder.add_document(tok.tokenize(doc) + [tok.eod], [len(tok.tokenize(doc)) + 1])
    builder.finalize(prefix + ".idx")

    seq = 128
    train, valid = D.indexed_datasets(prefix, seq, seed=5, splits=(0.9, 0.1), tokenizer=tok,
                                      cache_dir=str(tmp_path / "cache"))
    assert len(train) > len(valid) > 0
    corpus = "\n".join(docs)
    for ds in (train, valid):
        s = ds[0]
        assert set(s) >= {"tokens", "labels", "loss_mask", "position_ids"}
        assert s["tokens"].shape == s["labels"].shape == (seq,)
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        assert s["position_ids"].tolist() == list(range(seq))
        assert float(s["loss_mask"].sum()) == seq
        # Any stretch without an eod decodes to corpus text.
        pieces = [p for p in tok.detokenize(
            [t if t != tok.eod else ord("\x00") for t in s["tokens"].tolist()]).split("\x00") if len(p) > 8]
        assert pieces and all(p.strip("\ufffd") in corpus for p in pieces)
