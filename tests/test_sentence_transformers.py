"""prcl.integrations.sentence_transformers: losses checked against an eager float64 oracle, cached ==
plain under loss scaling and accumulation, and a few SentenceTransformerTrainer steps per variant.

Everything is offline: a 2-layer BERT and a word-level tokenizer are built here and saved to a temp dir.
"""
import copy
import functools
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentence_transformers")

from sentence_transformers import (  # noqa: E402
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast  # noqa: E402

import prcl  # noqa: E402
from prcl.core.contract import DEFAULT_SCALE  # noqa: E402
from prcl.integrations.sentence_transformers import (  # noqa: E402
    CachedPairRelevanceLoss,
    PairRelevanceLoss,
    excluded_pairs,
    text_groups,
)

WORDS = ("cat dog bird fish sat ran flew swam on in under near mat park tree lake red blue green small "
         "bank rates fell rose market shares python code model data cake oven bread flour team goal "
         "match season rain sun wind snow the a").split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: a second intra-op thread only adds contention on a busy 2-core CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


def save_tiny_model(path):
    """A 2-layer BERT (hidden 32, dropout off so two forwards agree) and a word-level tokenizer in path."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_model(model_dir):
    return SentenceTransformer(modules=[Transformer(model_dir), Pooling(32, "mean")], device="cpu")


def sentence(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))


def batch_texts(batch_size, seed):
    """(anchors, [positives, negatives], labels) with the duplicates the loss must handle:
    row 5 repeats row 0's positive, row 3's hard negative is row 7's positive, rows 9 and 10 share
    an anchor (different positives)."""
    rng = random.Random(seed)
    anchors = [sentence(rng) for _ in range(batch_size)]
    positives = [sentence(rng) for _ in range(batch_size)]
    negatives = [sentence(rng) for _ in range(batch_size)]
    positives[5] = positives[0]
    negatives[3] = positives[7]
    anchors[10] = anchors[9]
    labels = [round(rng.uniform(0.3, 1.0), 2) for _ in range(batch_size)]
    return anchors, [positives, negatives], labels


def expected_labels(anchors, columns, labels):
    """The (B, N) label matrix the loss should use, written out pair by pair (−1 = left out): a copy of
    one of the row's own documents, or of a document relevant (label > 0) to a row with the same anchor.
    labels[i]: the positive's relevance, or a list with one per document column of row i."""
    B = len(anchors)
    docs = [text for column in columns for text in column]
    row_labels = [labels[i] if isinstance(labels[i], list) else [labels[i]] + [0.0] * (len(columns) - 1)
                  for i in range(B)]
    relevant = {}  # anchor text -> texts relevant to some row with that anchor
    for i in range(B):
        relevant.setdefault(anchors[i], set()).update(docs[c * B + i] for c, y in enumerate(row_labels[i]) if y > 0)
    y = torch.zeros(B, len(docs), dtype=torch.float64)
    for i in range(B):
        own = {docs[c * B + i] for c in range(len(columns))}
        for j, doc in enumerate(docs):
            if j % B == i:
                y[i, j] = row_labels[i][j // B]
            elif doc in own or doc in relevant[anchors[i]]:
                y[i, j] = -1.0
    return y


def eager_loss(q, d, y, t, b):
    """SigLIP-style BCE over every pair, materialised: the oracle. b=None means −log(N−1)."""
    q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    b = -math.log(d.shape[0] - 1) if b is None else b
    z = t * q @ d.T + b
    per_pair = F.softplus(z) - y.clamp(min=0) * z
    return torch.where(y >= 0, per_pair, 0.0).sum() / q.shape[0]


def features(model, texts):
    return model.preprocess(texts)


def grads(model, *extra):
    params = [p for p in model.parameters() if p.requires_grad] + list(extra)
    # BERT's pooler is never used by mean pooling, so it has no gradient
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])


def rel_err(x, gold):
    return ((x.double() - gold).norm() / gold.norm()).item()


FLOOR = 1e-5  # float32, normwise


def run_eager(model, batches, factors, dtype, scale, bias, learnable):
    """Gold (float64) or eager baseline (float32): Σ over micro-batches of factor·loss, backward.
    Returns (losses, gradient of the model, then t's and b's parameters when learnable)."""
    model = copy.deepcopy(model).to(dtype)
    log_t = torch.tensor(math.log(scale), dtype=dtype, requires_grad=learnable)
    b_param = torch.tensor(0.0 if bias is None else bias, dtype=dtype, requires_grad=learnable)
    losses = []
    for (anchors, columns, labels), factor in zip(batches, factors):
        q = model(features(model, anchors))["sentence_embedding"]
        d = torch.cat([model(features(model, col))["sentence_embedding"] for col in columns])
        y = expected_labels(anchors, columns, labels).to(dtype)
        if learnable:
            b = b_param + (-math.log(d.shape[0] - 1) if bias is None else 0.0)
            loss = eager_loss(q, d, y, log_t.exp(), b)
        else:
            loss = eager_loss(q, d, y, scale, bias)
        (loss * factor).backward()
        losses.append(loss.detach().double())
    extra = [log_t, b_param] if learnable else []
    return torch.stack(losses), grads(model, *extra).double()


def run_loss(loss_fn, batches, factors):
    losses = []
    for (anchors, columns, labels), factor in zip(batches, factors):
        feats = [features(loss_fn.model, anchors)] + [features(loss_fn.model, col) for col in columns]
        loss = loss_fn(feats, torch.tensor(labels))
        (loss * factor).backward()
        losses.append(loss.detach().double())
    extra = [loss_fn.logit_scale, loss_fn.logit_bias] if loss_fn.learnable_scale else []
    return torch.stack(losses), grads(loss_fn.model, *extra).double()


@functools.cache
def oracle(model_dir, learnable, bias):
    """(gold float64, eager float32) results for the oracle test, shared by its plain and cached cases."""
    base = tiny_model(model_dir)
    return tuple(run_eager(base, ORACLE_BATCHES, FACTORS, dtype, 10.0, bias, learnable)
                 for dtype in (torch.float64, torch.float32))


# fp16-style loss scale 2^10 times 1/accumulation_steps, over two accumulated micro-batches
FACTORS = (1024 / 2, 1024 / 2)
ORACLE_BATCHES = [batch_texts(12, seed) for seed in (0, 1)]


@pytest.mark.parametrize("variant", ["plain", "cached"])
@pytest.mark.parametrize("learnable,bias", [(False, None), (True, None), (True, -3.0)],
                         ids=["fixed", "learnable-prior-offset", "learnable-bias"])
def test_matches_eager_oracle_under_scaling_and_accumulation(model_dir, variant, learnable, bias):
    """Loss values and every gradient (model, scale, bias) against a float64 eager oracle, over two
    accumulated micro-batches (B = 12, mini-batches of 5: not a multiple) with graded labels and
    duplicates; the error may be at most twice float32 eager's, plus a floor."""
    gold, eager = oracle(model_dir, learnable, bias)
    model = tiny_model(model_dir)
    kw = dict(scale=10.0, bias=bias, learnable_scale=learnable, learnable_bias=learnable)
    loss_fn = (PairRelevanceLoss(model, **kw) if variant == "plain"
               else CachedPairRelevanceLoss(model, mini_batch_size=5, **kw))
    ours = run_loss(loss_fn, ORACLE_BATCHES, FACTORS)
    for got, want, base_err in zip(ours, gold, eager):
        assert rel_err(got, want) <= 2 * rel_err(base_err, want) + FLOOR
    if learnable:  # the scale and bias gradients on their own, not drowned in the model's
        assert rel_err(ours[1][-2:], gold[1][-2:]) <= 2 * rel_err(eager[1][-2:], gold[1][-2:]) + FLOOR


def test_cached_equals_plain(model_dir):
    """Same loss and gradients, mini-batched or not (learnable scale and bias, accumulation)."""
    batches = [batch_texts(12, seed) for seed in (2, 3)]
    kw = dict(learnable_scale=True, learnable_bias=True)
    plain = run_loss(PairRelevanceLoss(tiny_model(model_dir), **kw), batches, FACTORS)
    cached = run_loss(CachedPairRelevanceLoss(tiny_model(model_dir), mini_batch_size=4, **kw), batches, FACTORS)
    # float32 noise only: the mini-batches pad to their own widths and sum in another order
    assert rel_err(cached[0], plain[0]) <= FLOOR
    assert rel_err(cached[1], plain[1]) <= FLOOR
    assert rel_err(cached[1][-2:], plain[1][-2:]) <= FLOOR  # scale and bias


def graded_negatives(labels):
    """Per-column labels: the hard negative of each row graded (0.3), left out (−1) or negative (0)."""
    return [[y, (0.3, -1.0, 0.0)[i % 3]] for i, y in enumerate(labels)]


@pytest.mark.parametrize("margin", [None, 0.0], ids=["plain", "false-negative-mask"])
@pytest.mark.parametrize("form", ["positive", "per-column"])
def test_equals_fused_pair_bce_on_the_same_embeddings(model_dir, form, margin):
    """The module's loss and embedding gradients equal prcl.fused_pair_bce given the dense label
    matrix written out by hand (the module itself builds sparse label_index rows); labels grade the
    positive only, or every document column of the row. With false_negative_margin, both mask."""
    model = tiny_model(model_dir)
    anchors, columns, labels = batch_texts(12, 4)
    if form == "per-column":
        labels = graded_negatives(labels)
    loss_fn = PairRelevanceLoss(model, false_negative_margin=margin)
    feats = [features(model, anchors)] + [features(model, col) for col in columns]
    with torch.no_grad():
        embeddings = [model(f)["sentence_embedding"] for f in feats]
    ours_in = [e.clone().requires_grad_() for e in embeddings]
    ref_in = [e.clone().requires_grad_() for e in embeddings]
    ours = loss_fn.compute_loss_from_embeddings(ours_in, loss_fn.targets(feats, torch.tensor(labels)))
    ours.backward()
    y = expected_labels(anchors, columns, labels).float()
    ref, masked = prcl.fused_pair_bce(F.normalize(ref_in[0], dim=-1), F.normalize(torch.cat(ref_in[1:]), dim=-1), y,
                                      scale=DEFAULT_SCALE, false_negative_margin=margin, return_masked=True)
    assert (masked.item() > 0) == (margin is not None)  # the mask has pairs to leave out here
    ref.backward()
    torch.testing.assert_close(ours, ref)
    for a, b in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad)


def test_16_bit_model_hands_the_loss_16_bit_embeddings(model_dir, monkeypatch):
    """Embeddings are normalised in float32, then reach prcl in the model's dtype; the loss is float32."""
    import prcl.integrations.sentence_transformers as module

    seen = []

    def recording(q, d, *args, **kwargs):
        seen.append((q.detach(), d.detach()))
        return prcl.fused_pair_bce(q, d, *args, **kwargs)

    monkeypatch.setattr(module, "fused_pair_bce", recording)
    model = tiny_model(model_dir).to(torch.bfloat16)
    anchors, columns, labels = batch_texts(12, 4)
    feats = [features(model, anchors)] + [features(model, col) for col in columns]
    embeddings = [model(f)["sentence_embedding"] for f in feats]
    assert embeddings[0].dtype == torch.bfloat16
    loss_fn = PairRelevanceLoss(model)
    loss = loss_fn.compute_loss_from_embeddings(embeddings, loss_fn.targets(feats, torch.tensor(labels)))
    assert loss.dtype == torch.float32
    (q, d), = seen
    assert q.dtype == d.dtype == torch.bfloat16
    expected = F.normalize(embeddings[0].detach().float(), dim=-1).to(torch.bfloat16)
    torch.testing.assert_close(q, expected, rtol=0, atol=0)
    loss.backward()
    assert grads(model).isfinite().all() and grads(model).abs().sum() > 0


def test_excluded_pairs_by_hand():
    # B = 3, one negative column. Documents: 0 "x", 1 "y", 2 "x" | 3 "y", 4 "z", 5 "w".
    docs = torch.tensor([0, 1, 0, 1, 2, 3])
    anchors = torch.tensor([0, 1, 2])
    rows, cols = excluded_pairs(anchors, docs)
    # query 0 lists x, y: leaves out 1 (y) and 2 (x); query 1 lists y, z: leaves out 3;
    # query 2 lists x, w: leaves out 0
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (0, 2), (1, 3), (2, 0)]
    rows, cols = excluded_pairs(torch.tensor([7, 8, 7]), torch.arange(6))  # queries 0 and 2 repeat
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 2), (2, 0)]


def test_excluded_pairs_follow_the_labels_of_a_repeated_anchor():
    """A repeated anchor's relevant documents (label > 0, and their copies) are left out for its twin, as
    build_batch leaves them out (the one rule, prcl.training.batching.excluded_pairs)."""
    anchors, docs = torch.tensor([7, 8, 7]), torch.tensor([0, 1, 2, 3, 4, 0])  # doc 5 copies doc 0
    rows, cols = excluded_pairs(anchors, docs)
    # query 0 leaves out doc 2 (the positive of query 2, its twin) and doc 5 (a copy of its own positive);
    # query 2 leaves out doc 0 (a copy of its doc 5)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 2), (0, 5), (2, 0)]
    relevant = torch.tensor([True, True, False, False, False, True])  # query 2's positive graded 0: a negative
    rows, cols = excluded_pairs(anchors, docs, relevant)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 5), (2, 0)]


def test_text_groups_ignore_padding_side_and_width():
    right = {"input_ids": torch.tensor([[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])}
    left = {"input_ids": torch.tensor([[0, 2, 7, 3], [2, 5, 6, 3]]),
            "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}
    groups = text_groups([right, left]).tolist()
    assert groups[0] == groups[3] and groups[1] == groups[2] and groups[0] != groups[1]


def test_no_duplicates_uses_the_diagonal_form(model_dir):
    model = tiny_model(model_dir)
    feats = [features(model, ["the cat", "a dog"]), features(model, ["red mat", "blue lake"])]
    assert PairRelevanceLoss(model).targets(feats) == (None, None)


def test_bad_input(model_dir):
    model = tiny_model(model_dir)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="scale"):
            PairRelevanceLoss(model, scale=bad)
    with pytest.raises(ValueError, match="bias"):
        PairRelevanceLoss(model, bias=float("nan"))
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedPairRelevanceLoss(model, mini_batch_size=0)
    loss_fn = PairRelevanceLoss(model)
    feats = [features(model, ["the cat", "a dog"]), features(model, ["red mat", "blue lake"])]
    with pytest.raises(ValueError, match="sentence_features"):
        loss_fn(feats[:1], None)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(feats, torch.tensor([1.0, 0.5, 0.2]))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(feats, torch.tensor([1.0, 2.0]))  # prcl's own check: relevance must lie in [0, 1]
    with pytest.raises(ValueError, match=r"labels: .*a list of 1 per row"):
        loss_fn(feats, torch.tensor([[1.0, 0.5], [1.0, 0.5]]))  # two labels, one document column


def test_gather_across_devices_needs_torch_distributed(model_dir):
    model = tiny_model(model_dir)
    feats = [features(model, ["the cat", "a dog"]), features(model, ["red mat", "blue lake"])]
    with pytest.raises(RuntimeError, match="torch.distributed"):
        PairRelevanceLoss(model, gather_across_devices=True)(feats, None)


def test_config_and_citation(model_dir):
    loss_fn = CachedPairRelevanceLoss(tiny_model(model_dir), learnable_bias=True, mini_batch_size=8,
                                      false_negative_margin=0.1)
    assert PairRelevanceLoss(tiny_model(model_dir), teacher=model_dir).get_config_dict()["teacher"] == model_dir
    config = loss_fn.get_config_dict()
    assert config["scale"] == DEFAULT_SCALE and config["bias"].startswith("-log(N-1)") and config["mini_batch_size"] == 8
    assert config["false_negative_margin"] == 0.1
    assert "Sigmoid Loss" in loss_fn.citation and "Memory Limited" in loss_fn.citation


def tiny_teacher(model_dir, retokenize):
    """The tiny model with other weights; a shorter max_seq_length makes the loss decode and re-tokenize."""
    teacher = tiny_model(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn_like(p))
    if retokenize:
        teacher.max_seq_length = 32
    return teacher


def teacher_labels_by_hand(teacher, anchors, columns, labels):
    """calibrated labels written out pair by pair in float64 from the teacher's own encode of the texts:
    listed pairs (each row's labelled columns, excluded pairs) keep expected_labels'; the others get
    top · clamp((s − median) / (p − median), 0, 1), p = the teacher's cosine of the row's top-label documents."""
    B = len(anchors)
    docs = [text for column in columns for text in column]
    data = expected_labels(anchors, columns, labels)
    enc = functools.partial(teacher.encode, convert_to_tensor=True, normalize_embeddings=True)
    s = (enc(anchors).double() @ enc(docs).double().T)
    n_labelled = len(labels[0]) if isinstance(labels[0], list) else 1
    out = torch.zeros_like(data)
    for i in range(B):
        listed = {c * B + i for c in range(n_labelled)} | {j for j in range(len(docs)) if data[i, j] < 0}
        top = max(data[i, j].item() for j in listed)
        p = max((s[i, j].item() for j in listed if top > 0 and data[i, j] == top), default=-math.inf)
        median = sorted(s[i].tolist())[(len(docs) - 1) // 2]
        for j in range(len(docs)):
            if j in listed:
                out[i, j] = data[i, j]
            elif p > median:
                out[i, j] = top * min(max((s[i, j].item() - median) / (p - median), 0.0), 1.0)
    return out


@pytest.mark.parametrize("form", ["positive", "per-column"])
@pytest.mark.parametrize("retokenize", [False, True], ids=["token-ids", "decoded-texts"])
def test_teacher_grades_every_unlisted_pair(model_dir, retokenize, form):
    """With teacher=, targets() are dense (B, N) labels: the data's where it lists a pair (the row's
    labelled columns, the excluded duplicates), the calibrated teacher cosine elsewhere, equal to the
    calibration written out by hand on the teacher's own encode; the loss is prcl's on those labels."""
    model, teacher = tiny_model(model_dir), tiny_teacher(model_dir, retokenize)
    anchors, columns, labels = batch_texts(12, 6)
    if form == "per-column":
        labels = graded_negatives(labels)
    loss_fn = PairRelevanceLoss(model, teacher=teacher)
    assert loss_fn.teacher.retokenize == retokenize
    feats = [features(model, anchors)] + [features(model, col) for col in columns]
    y, label_index = loss_fn.targets(feats, torch.tensor(labels))
    want = teacher_labels_by_hand(teacher, anchors, columns, labels)
    assert label_index is None and ((want > 0) & (want < 1)).sum() > 12  # the teacher grades many pairs
    # float32 cosines, divided by p − median (~0.1): label noise ~1e-5; a wrong label is off by ~0.1
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-4)
    with torch.no_grad():
        q = model(features(model, anchors))["sentence_embedding"]
        d = torch.cat([model(features(model, col))["sentence_embedding"] for col in columns])
    loss = loss_fn(feats, torch.tensor(labels))
    gold = eager_loss(q.double(), d.double(), want, DEFAULT_SCALE, None)
    assert rel_err(loss.detach(), gold) <= 1e-5


@pytest.mark.parametrize("labels", [None, [1.0, 0.4, 0.8]], ids=["no-label-column", "graded-positives"])
def test_teacher_on_the_diagonal_forms(model_dir, labels):
    """No duplicates, so the data's labels are the diagonal form (None or a graded positive per row):
    the teacher's labels follow the same calibration, capped at the row's own positive's relevance."""
    model, teacher = tiny_model(model_dir), tiny_teacher(model_dir, retokenize=False)
    anchors, docs = ["the cat sat", "a dog ran", "red fish swam"], ["on the mat", "in the park", "under a tree"]
    feats = [features(model, anchors), features(model, docs)]
    y, label_index = PairRelevanceLoss(model, teacher=teacher).targets(
        feats, None if labels is None else torch.tensor(labels))
    want = teacher_labels_by_hand(teacher, anchors, [docs], [1.0] * 3 if labels is None else labels)
    assert label_index is None and (y.diagonal() == torch.tensor(labels or [1.0] * 3)).all()
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-4)
    assert (y <= y.diagonal()[:, None]).all()


def test_cached_teacher_equals_plain_teacher(model_dir):
    """The cached loss's teacher embeds mini_batch_size rows per forward: the same labels, loss and gradients."""
    batches = [batch_texts(12, seed) for seed in (2, 3)]
    plain = run_loss(PairRelevanceLoss(tiny_model(model_dir), teacher=tiny_teacher(model_dir, False)), batches, FACTORS)
    cached = run_loss(CachedPairRelevanceLoss(tiny_model(model_dir), mini_batch_size=5,
                                              teacher=tiny_teacher(model_dir, False)), batches, FACTORS)
    without = run_loss(PairRelevanceLoss(tiny_model(model_dir)), batches, FACTORS)
    assert rel_err(cached[0], plain[0]) <= FLOOR and rel_err(cached[1], plain[1]) <= FLOOR
    assert rel_err(without[0], plain[0]) > 0.01  # the teacher's labels change the loss


def test_teacher_reads_texts_unless_the_tokenizers_agree_at_this_batch(model_dir):
    """The same vocabulary with another normaliser is another tokenizer; a student's max_seq_length raised
    past the teacher's after the loss was built sends the teacher texts from then on."""
    model, teacher = tiny_model(model_dir), tiny_teacher(model_dir, retokenize=False)
    loss_fn = PairRelevanceLoss(model, teacher=teacher)
    assert not loss_fn.teacher.retokenize
    model.max_seq_length = teacher.max_seq_length + 1
    assert loss_fn.teacher.retokenize
    cased = tiny_teacher(model_dir, retokenize=False)
    cased.tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([])
    assert cased.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert PairRelevanceLoss(tiny_model(model_dir), teacher=cased).teacher.retokenize


def test_a_student_padding_on_the_other_side_sends_the_teacher_texts(model_dir):
    """The teacher would read a left-padded student's ids as its own right-padded ones (BERT's positions
    start at the padding): the ids path only when the padding sides agree."""
    model, teacher = tiny_model(model_dir), tiny_teacher(model_dir, retokenize=False)
    model.tokenizer.padding_side = "left"
    loss_fn = PairRelevanceLoss(model, teacher=teacher)
    assert loss_fn.teacher.retokenize
    anchors, columns, labels = batch_texts(12, 0)
    feats = [features(model, anchors)] + [features(model, col) for col in columns]
    assert (feats[0]["attention_mask"][:, 0] == 0).any()  # left-padded
    y, _ = loss_fn.targets(feats, torch.tensor(labels))
    torch.testing.assert_close(y.double(), teacher_labels_by_hand(teacher, anchors, columns, labels), rtol=0, atol=2e-4)


def test_a_teacher_given_as_a_path_loads_in_float32(model_dir, tmp_path):
    half = tiny_model(model_dir).to(torch.bfloat16)
    half.save(str(tmp_path / "bf16"))
    assert SentenceTransformer(str(tmp_path / "bf16"), device="cpu")[0].auto_model.dtype == torch.bfloat16
    loss_fn = PairRelevanceLoss(tiny_model(model_dir), teacher=tmp_path / "bf16")  # a pathlib.Path too
    assert {p.dtype for p in loss_fn.teacher.model.parameters()} == {torch.float32}


def test_a_teacher_with_nan_embeddings_stops_naming_the_teacher(model_dir):
    model, teacher = tiny_model(model_dir), tiny_teacher(model_dir, retokenize=False)
    with torch.no_grad():
        next(teacher.parameters()).fill_(float("nan"))
    feats = [features(model, ["the cat", "a dog"]), features(model, ["red mat", "blue lake"])]
    with pytest.raises(ValueError, match="^teacher: .*not finite"):
        PairRelevanceLoss(model, teacher=teacher)(feats, None)


def test_teacher_refusals(model_dir, tmp_path):
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    model = tiny_model(model_dir)
    static = SentenceTransformer(modules=[StaticEmbedding(model.tokenizer, embedding_dim=8)], device="cpu")
    for kw in ({"teacher": model}, {"teacher": SentenceTransformer(modules=[model[0], Pooling(32, "cls")])},
               {"teacher": torch.nn.Linear(2, 2)}, {"teacher": static}, {"teacher": model_dir + "-missing"},
               {"teacher": ""}, {"teacher": str(tmp_path)},
               {"teacher": SentenceTransformer(modules=[Pooling(32, "mean")], device="cpu")},  # no tokenizer
               {"teacher": tiny_model(model_dir).to("meta")},
               {"teacher": tiny_model(model_dir), "false_negative_margin": 0.1},
               {"teacher": tiny_model(model_dir), "gather_across_devices": True}):
        with pytest.raises(ValueError, match="^teacher: "):
            PairRelevanceLoss(model, **kw)


def test_a_local_teacher_path_gets_the_model_directory_checks(model_dir, tmp_path):
    with pytest.raises(ValueError, match="^teacher: .* holds neither config.json nor modules.json"):
        PairRelevanceLoss(tiny_model(model_dir), teacher=tmp_path)


def test_import_prcl_does_not_need_sentence_transformers():
    code = ("import sys, prcl; bad = [m for m in sys.modules if m.startswith(('sentence_transformers', "
            "'prcl.integrations'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def train_dataset(rows=24, seed=5, graded=False):
    datasets = pytest.importorskip("datasets")  # SentenceTransformerTrainer needs it; the losses don't
    rng = random.Random(seed)
    data = {"anchor": [], "positive": [], "negative": [], "label": []}
    for _ in range(rows):
        data["anchor"].append(sentence(rng))
        data["positive"].append(sentence(rng))
        data["negative"].append(sentence(rng))
        data["label"].append(round(rng.uniform(0.5, 1.0), 2))
    data["positive"][4] = data["positive"][1]  # a duplicate inside the first batch
    if graded:
        data["label"] = graded_negatives(data["label"])
    return datasets.Dataset.from_dict(data)


@pytest.mark.parametrize("variant", ["plain", "graded-negatives", "cached", "learnable", "teacher", "cached-teacher"])
def test_trainer_steps(model_dir, tmp_path, variant):
    model = tiny_model(model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    mapping = {}
    teacher = tiny_teacher(model_dir, retokenize=variant == "cached-teacher")
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    if variant in ("plain", "graded-negatives"):
        loss_fn = PairRelevanceLoss(model)
    elif variant == "teacher":
        loss_fn = PairRelevanceLoss(model, teacher=teacher)
    elif variant == "cached-teacher":
        loss_fn = CachedPairRelevanceLoss(model, mini_batch_size=3, teacher=teacher)
    elif variant == "cached":
        loss_fn = CachedPairRelevanceLoss(model, mini_batch_size=3)
    else:
        loss_fn = PairRelevanceLoss(model, learnable_scale=True, learnable_bias=True)
        mapping = {r"logit_(scale|bias)": 0.05}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
        gradient_accumulation_steps=2 if variant == "cached" else 1, learning_rate_mapping=mapping,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, loss=loss_fn,
                                         train_dataset=train_dataset(graded=variant == "graded-negatives"))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))  # frozen
    if variant == "learnable":
        optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert id(loss_fn.logit_scale) in optimised and id(loss_fn.logit_bias) in optimised
        assert loss_fn.logit_scale.item() != pytest.approx(math.log(DEFAULT_SCALE))
        assert loss_fn.logit_bias.item() != 0.0


# --- gather_across_devices: 2 gloo ranks against one process on the whole batch -------------------

def dist_batch():
    """batch_texts(12) with every duplicate inside one rank's half (rows 0–5 | 6–11): duplicates are
    found among the local documents only."""
    anchors, (positives, negatives), labels = batch_texts(12, 6)
    negatives[3] = positives[1]
    return anchors, [positives, negatives], labels


DIST_VARIANTS = ((PairRelevanceLoss, {}), (CachedPairRelevanceLoss, {"mini_batch_size": 4}))


def _gather_worker(rank, world, store, model_dir, out):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    anchors, columns, labels = dist_batch()
    rows = slice(rank * 6, rank * 6 + 6)
    results = []
    for cls, kw in DIST_VARIANTS:
        model = tiny_model(model_dir)
        loss_fn = cls(model, learnable_scale=True, learnable_bias=True, gather_across_devices=True, **kw)
        feats = [features(model, anchors[rows])] + [features(model, col[rows]) for col in columns]
        loss = loss_fn(feats, torch.tensor(labels[rows]))
        loss.backward()
        model_grads = grads(model)
        dist.all_reduce(model_grads)  # what DDP does with the model's gradients: average over ranks
        logged = loss.detach().clone()
        dist.all_reduce(logged)  # the trainer logs the mean over ranks
        results.append({"loss": logged / world, "model": model_grads / world,
                        "scale_bias": torch.stack([loss_fn.logit_scale.grad, loss_fn.logit_bias.grad])})
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import sentence-transformers: ~25 s of CPU
def test_gather_across_devices_two_gloo_ranks(model_dir, tmp_path):
    """Each rank embeds half the batch; with DDP's gradient average (emulated), the loss, model
    gradients and scale/bias gradients equal one process on the whole batch."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), model_dir, str(tmp_path)), nprocs=2,
                   join=False)
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=0.5):
            assert time.monotonic() < deadline, "the 2-rank process group did not finish in 120 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    anchors, columns, labels = dist_batch()
    for v, (cls, kw) in enumerate(DIST_VARIANTS):
        model = tiny_model(model_dir)
        loss_fn = cls(model, learnable_scale=True, learnable_bias=True, **kw)
        feats = [features(model, anchors)] + [features(model, col) for col in columns]
        loss = loss_fn(feats, torch.tensor(labels))
        loss.backward()
        for rank in ranks:
            got = rank[v]
            assert rel_err(got["loss"], loss.detach().double()) <= FLOOR
            assert rel_err(got["model"], grads(model).double()) <= FLOOR
            want = torch.stack([loss_fn.logit_scale.grad, loss_fn.logit_bias.grad]).double()
            assert rel_err(got["scale_bias"], want) <= FLOOR
