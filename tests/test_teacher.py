"""Teacher-graded labels (prcl.training.teacher): the calibration against its formula written out in
float64, every pair listed, and `prcl train --teacher` end to end on tiny models."""
import math

import pytest
import torch
from test_training import config, tiny_encoder
from tiny_llm import tiny_model_and_tokenizer

from prcl.training import Example, build_batch, train
from prcl.training import loop as train_loop
from prcl.training.cli import parse_train_args
from prcl.training.teacher import calibrated_labels, load_teacher, teacher_batch


def small_batch():
    exs = [Example("q0", ("p0",), ("n0",)), Example("q1", ("p1",), (), graded=(("g1", 0.5),)),
           Example("q2", ("p2", "p0"), ()), Example("q3", ("p3",), ("n3",))]
    return build_batch(exs)


def formula(s, batch):
    """The module docstring's calibration, one pair at a time, in float64."""
    dense = batch.dense_labels().double()
    listed = {(i, int(c)) for i in range(len(batch.queries)) for c in batch.label_index[i] if c >= 0}
    out = torch.zeros_like(dense)
    for i in range(s.shape[0]):
        row = sorted(s[i].double().tolist())
        median = row[(len(row) - 1) // 2]  # torch.median: the lower of the two middle values
        top = dense[i].max().item()  # the row's positives: its listed pairs of the top label
        pos = [s[i, j].item() for j in range(s.shape[1]) if top > 0 and dense[i, j] == top]
        p = max(pos) if pos else -math.inf
        for j in range(s.shape[1]):
            if (i, j) in listed:
                out[i, j] = dense[i, j]
            elif p > median:
                out[i, j] = top * min(max((s[i, j].item() - median) / (p - median), 0.0), 1.0)
    return out


def test_calibration_is_the_documented_formula():
    batch = small_batch()
    B, N = batch.shape
    torch.manual_seed(0)
    for _ in range(20):
        s = torch.randn(B, N).tanh()
        torch.testing.assert_close(calibrated_labels(s, batch.labels, batch.label_index).double(), formula(s, batch), rtol=1e-6, atol=1e-6)


def test_calibration_keeps_listed_labels_and_zeroes_rows_the_teacher_contradicts():
    batch = small_batch()
    B, N = batch.shape
    col = {t: j for j, t in enumerate(batch.docs)}
    s = torch.full((B, N), 0.1)
    s[0, col["p0"]], s[0, col["p3"]], s[0, col["p1"]] = 0.9, 0.9, 0.5  # p3 as close as q0's positive
    s[0, col["n0"]] = 0.7  # q0's hard negative: unlisted (y = 0 is implicit), so the teacher grades it
    s[1, col["p1"]] = -0.5  # the teacher scores q1's positive below the batch's median
    s[1, col["p2"]], s[1, col["g1"]] = 0.8, 0.9  # q1's graded document: listed, and not the row's positive
    y = calibrated_labels(s, batch.labels, batch.label_index)
    # row 0's median is 0.5 (p1): p1 gets 0, n0 halfway to the positive's 0.9
    assert y[0, col["p3"]] == 1.0 and y[0, col["p1"]] == 0.0 and y[0, col["n3"]] == 0.0
    assert y[0, col["p0"]] == 1.0 and y[0, col["n0"]] == pytest.approx(0.5)
    assert y[1, col["g1"]] == 0.5 and y[1, col["p2"]] == 0.0  # no usable scale in row 1: unlisted stay 0
    assert y[2, col["p0"]] == 1.0  # q2 lists p0 too
    assert ((y >= -1) & (y <= 1)).all()


def test_a_graded_zero_stays_zero_where_a_hard_negative_is_graded():
    """A graded document of relevance 0 was judged irrelevant: listed, the teacher leaves it 0; a hard
    negative is left implicit, so the teacher grades it (the loss without a teacher is the same either way)."""
    batch = build_batch([Example("q0", ("p0",), ("n0",), graded=(("g0", 0.0),))] +
                        [Example(f"q{i}", (f"p{i}",), ()) for i in (1, 2, 3)])
    col = {t: j for j, t in enumerate(batch.docs)}
    s = torch.full(batch.shape, 0.1)  # row 0's median: 0.1
    s[0, col["p0"]], s[0, col["g0"]], s[0, col["n0"]] = 0.9, 0.95, 0.5
    y = calibrated_labels(s, batch.labels, batch.label_index)
    assert y[0, col["g0"]] == 0.0 and y[0, col["n0"]] == pytest.approx(0.5)  # (0.5 − 0.1) / (0.9 − 0.1)
    assert batch.dense_labels()[0].tolist() == [1.0 if t == "p0" else 0.0 for t in batch.docs]


def test_a_teacher_with_nan_embeddings_stops_naming_the_teacher():
    teacher = tiny_encoder(r=4)
    with torch.no_grad():
        teacher.model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="^teacher: its embeddings are not finite"):
        teacher_batch(small_batch(), teacher, batch_size=4)


def test_a_16_bit_teacher_is_loaded_in_float32(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer("llama", seed=1)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    teacher = load_teacher(str(tmp_path / "bf16"), max_length=8, device=torch.device("cpu"))
    assert {p.dtype for p in teacher.model.parameters()} == {torch.float32}


def test_teacher_batch_has_dense_labels():
    batch = small_batch()
    teacher = tiny_encoder(r=4)
    out = teacher_batch(batch, teacher, batch_size=3)
    assert out.label_index is None and out.labels.shape == batch.shape
    q, d = teacher.encode(batch.queries).float(), teacher.encode(batch.docs).float()
    torch.testing.assert_close(out.labels, calibrated_labels(q @ d.T, batch.labels, batch.label_index))
    torch.testing.assert_close(out.dense_labels(), out.labels)
    assert (out.docs, out.queries, out.instructions) == (batch.docs, batch.queries, batch.instructions)


def test_train_with_a_teacher(tmp_path, monkeypatch):
    teacher_dir = tmp_path / "teacher"
    model, tokenizer = tiny_model_and_tokenizer("llama", seed=1)
    model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    assert parse_train_args(["--data", "x", "--out", "o", "--teacher", str(teacher_dir)]).teacher == str(teacher_dir)
    with pytest.raises(ValueError, match="^teacher: no such file"):
        config(tmp_path, teacher=str(tmp_path / "missing")).validate()
    for bad in (dict(loss="softmax"), dict(false_negative_margin=0.1)):
        with pytest.raises(ValueError, match="^teacher: graded labels for PRCL only"):
            config(tmp_path, teacher=str(teacher_dir), **bad).validate()

    graded = []
    monkeypatch.setattr(train_loop, "teacher_batch", lambda b, t, n: graded.append(n) or teacher_batch(b, t, n))
    plain = train(config(tmp_path / "a", max_steps=2), encoder=tiny_encoder())
    taught = train(config(tmp_path / "b", max_steps=2, teacher=str(teacher_dir)), encoder=tiny_encoder())
    assert graded == [4, 4] and all(math.isfinite(x) for x in taught["losses"])  # the config's mini-batch size
    assert taught["losses"][0] != plain["losses"][0]  # the same first batch, now with graded negatives

    monkeypatch.setattr(train_loop, "setup", lambda timeout: (None, 0, 2))
    with pytest.raises(ValueError, match="teacher: not supported under torchrun"):
        train(config(tmp_path / "c", max_steps=1, batch_size=8, teacher=str(teacher_dir)), encoder=tiny_encoder())


def test_a_sentence_transformers_teacher_embeds_as_sentence_transformers_does(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model, tokenizer = tiny_model_and_tokenizer("llama", seed=2)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    word = Transformer(str(tmp_path / "hf"))
    SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean")]).save(
        str(tmp_path / "st"))
    teacher = load_teacher(str(tmp_path / "st"), max_length=8, device=torch.device("cpu"))
    texts = ["open a file", "read bytes from a descriptor", "x"]
    expected = torch.nn.functional.normalize(SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(
        texts, convert_to_tensor=True), dim=-1)
    torch.testing.assert_close(teacher.encode(texts, batch_size=2), expected)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
