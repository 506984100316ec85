"""prcl's pair relevance loss as a sentence-transformers loss: one line in a SentenceTransformerTrainer.

    loss = prcl.fused_pair_bce(â, cat(p̂, n̂_1, …, n̂_k), label, scale=t, bias=b)     x̂ = x / ‖x‖

Columns (anchor, positive[, negative_1 … negative_k]) give B queries and N = B·(1+k) documents;
query i is scored against every document in the batch, its own positive is the labelled pair
(relevance 1, or the `label` column, which may also grade its own negatives), everything else is a
negative, except pairs whose
document repeats a text the query already lists (see `excluded_pairs`): those are left out.

Needs the `st` extra (`pip install prcl[st]`); `import prcl` never imports this module.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sentence_transformers.base.losses import CachedLossMixin, has_static_embedding_input
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.util import batch_to_device
from torch import Tensor

from prcl.core.contract import DEFAULT_SCALE, DTYPES
from prcl.encoders import compute_dtype
from prcl.files import check_model_path, load_errors
from prcl.functional import fused_pair_bce
from prcl.nn import PairBCELoss
from prcl.training import batching
from prcl.training.teacher import calibrated_labels

__all__ = ["PairRelevanceLoss", "CachedPairRelevanceLoss", "text_groups", "excluded_pairs"]

SIGLIP_CITATION = """
@inproceedings{zhai2023sigmoid,
    title={Sigmoid Loss for Language Image Pre-Training},
    author={Xiaohua Zhai and Basil Mustafa and Alexander Kolesnikov and Lucas Beyer},
    booktitle={ICCV},
    year={2023},
    eprint={2303.15343},
    archivePrefix={arXiv}
}
"""

GRADCACHE_CITATION = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv}
}
"""


# ---------------------------------------------------------------------------------------------
# Duplicate texts: found from the token ids, so they cost no extra forward pass.
# ---------------------------------------------------------------------------------------------

def _token_rows(features):
    """(rows, width) token ids with padding removed and -1 after the text; None if not padded ids."""
    ids = features.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or "cu_seq_lens_q" in features:
        return None  # StaticEmbedding's flat id stream, FA2-flattened batches, images: not compared
    mask = features.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        return ids
    pad = ~mask.bool()
    # A stable sort on the padding flag moves the text to the front whichever side the tokenizer
    # pads, so one text gets one row even when two columns were padded to different widths.
    order = torch.argsort(pad.int(), dim=1, stable=True)
    return ids.masked_fill(pad, -1).gather(1, order)


def text_groups(columns: list[dict]) -> Tensor | None:
    """One id per row of the concatenated columns, equal exactly when the token ids are; or None."""
    rows = [_token_rows(features) for features in columns]
    if any(r is None for r in rows):
        return None
    width = max(r.shape[1] for r in rows)
    rows = torch.cat([F.pad(r, (0, width - r.shape[1]), value=-1) for r in rows])
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def excluded_pairs(anchor_groups: Tensor, doc_groups: Tensor,
                   relevant: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(query rows, document rows) of the pairs left out of the loss: prcl.training.batching's rule
    (excluded_pairs) on this batch's layout.

    Documents are the columns concatenated, so document j belongs to query j % B. Query i does not
    score document j (of another query) when j repeats the text of one of i's own documents (a
    copy of i's positive is not a negative; a copy of i's hard negative would be counted twice),
    nor a document relevant to another query with i's exact text (that document answers i too).
    relevant: (N,) bool, which documents are relevant to their query; default: the positives.
    """
    B, N = anchor_groups.shape[0], doc_groups.shape[0]
    cols = torch.arange(N, device=doc_groups.device)
    if relevant is None:
        relevant = cols < B
    return batching.excluded_pairs(anchor_groups, doc_groups, cols % B, cols, relevant)


def pair_targets(labels: Tensor | None, rows: Tensor, cols: Tensor,
                 batch_size: int) -> tuple[Tensor | None, Tensor | None]:
    """(labels, label_index) for prcl: the diagonal form when only the positives are labelled and
    nothing is excluded, else (B, K) sparse rows: the labelled columns first (column c of row i is
    document c·B + i), then the excluded documents with label −1."""
    if rows.numel() == 0 and (labels is None or labels.dim() == 1):
        return labels, None
    device = rows.device
    labels = torch.ones(batch_size, 1, device=device) if labels is None else labels.reshape(batch_size, -1)
    n_labelled = labels.shape[1]
    counts = torch.bincount(rows, minlength=batch_size)
    k = n_labelled + (int(counts.max()) if rows.numel() else 0)  # a host read only when pairs are excluded
    label_index = torch.full((batch_size, k), -1, dtype=torch.int64, device=device)
    y = torch.full((batch_size, k), -1.0, device=device)
    label_index[:, :n_labelled] = (torch.arange(batch_size, device=device)[:, None]
                                   + batch_size * torch.arange(n_labelled, device=device))
    y[:, :n_labelled] = labels
    slot = n_labelled + torch.arange(rows.numel(), device=device) - (counts.cumsum(0) - counts)[rows]
    label_index[rows, slot] = cols
    return y, label_index


# ---------------------------------------------------------------------------------------------
# Across ranks
# ---------------------------------------------------------------------------------------------

class _MeanGradAcrossRanks(torch.autograd.Function):
    """Identity whose backward averages the gradient over ranks: the loss's own parameters live
    outside the DDP-wrapped model, so nothing else would keep them equal on every rank."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


def _require_distributed():
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_across_devices=True scores each rank's queries against every rank's "
                           "documents through torch.distributed, which is not initialised in this process; "
                           "launch with torchrun / accelerate launch, or set gather_across_devices=False")


# ---------------------------------------------------------------------------------------------
# A teacher grading every pair
# ---------------------------------------------------------------------------------------------

class _Teacher:
    """A frozen SentenceTransformer that embeds the student's batches (PairRelevanceLoss's teacher=).

    Not a submodule of the loss: it stays on its own device, out of loss.parameters() and state_dict().
    It reads the student's token ids when the two tokenizers are the same (vocabulary, normalisation,
    special tokens, padding side) and its max_seq_length is at least the student's at that batch, else
    texts decoded from those ids (sentence-transformers' GISTEmbedLoss does the same).
    rows: embed that many rows per forward (the cached loss's mini_batch_size); None: a column at once."""

    def __init__(self, teacher: Any, model: Any, rows: int | None) -> None:
        from sentence_transformers import SentenceTransformer

        if isinstance(teacher, (str, os.PathLike)):
            if not os.fspath(teacher):
                raise ValueError("teacher: an empty path or name")
            if os.path.exists(teacher):  # a local model (else a name on the hub or in its cache)
                check_model_path(os.fspath(teacher), name="teacher")
            with load_errors("teacher", teacher):  # missing, not on the hub or in its cache, not a model
                teacher = SentenceTransformer(os.fspath(teacher), device=str(model.device)).float()
        if not isinstance(teacher, SentenceTransformer):
            raise ValueError(f"teacher: expected a SentenceTransformer (or a path or name to load as one), "
                             f"got {type(teacher).__name__}")
        for who, m in (("the teacher", teacher), ("the model being trained", model)):
            if not hasattr(getattr(m, "tokenizer", None), "get_vocab"):
                raise ValueError(f"teacher: {who} has no transformers tokenizer; the teacher reads the model's "
                                 f"token ids or the texts decoded from them")
        if any(p.is_meta for p in teacher.parameters()):
            raise ValueError("teacher: its weights are on the meta device (not loaded); load them first")
        if {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
            raise ValueError("teacher: shares parameters with the model being trained; pass a separate model "
                             "(e.g. SentenceTransformer(path) of the same checkpoint), which stays frozen")
        self.same_tokenizer = _tokenizer_state(model.tokenizer) == _tokenizer_state(teacher.tokenizer)
        static = has_static_embedding_input(model), has_static_embedding_input(teacher)
        if any(static) and not (all(static) and self.same_tokenizer):
            raise ValueError("teacher: with a StaticEmbedding model or teacher, both must be StaticEmbeddings with one "
                             "tokenizer (a StaticEmbedding's flat token ids are not decoded back to texts)")
        self.model, self.student, self.rows = teacher.requires_grad_(False), model, rows
        self.tokenizer = model.tokenizer  # kept: a DDP-wrapped model has no tokenizer attribute

    @property
    def retokenize(self) -> bool:
        """Whether the teacher reads decoded texts; read per batch, as max_seq_length may change."""
        return (not self.same_tokenizer or self.model.max_seq_length < self.student.max_seq_length
                or getattr(self.model.tokenizer, "padding_side", None) != getattr(self.tokenizer, "padding_side", None))

    @torch.no_grad()
    def cosines(self, sentence_features: list[dict]) -> Tensor:
        """(B, N) float32 cosines of the anchors and the concatenated documents, on the features' device."""
        teacher = self.model
        training = teacher.training
        teacher.eval()  # whatever mode the user or trainer left it in
        embeddings = [self._embed(teacher, features) for features in sentence_features]
        teacher.train(training)
        device = sentence_features[0]["input_ids"].device
        q, d = (F.normalize(e.float(), dim=-1).to(device) for e in (embeddings[0], torch.cat(embeddings[1:])))
        return q @ d.T

    def _embed(self, teacher: Any, features: dict) -> Tensor:
        if self.retokenize:
            texts = _column_texts(self.tokenizer, features)
            return teacher.encode(texts, batch_size=self.rows or len(texts), convert_to_tensor=True,
                                  show_progress_bar=False)
        features = batch_to_device(dict(features), teacher.device)  # a copy: a model writes into its inputs
        n = features["input_ids"].shape[0]
        if self.rows is None or "cu_seq_lens_q" in features or "offsets" in features:
            return teacher(features)["sentence_embedding"]
        return torch.cat([teacher({k: v[i:i + self.rows] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n
                                   else v for k, v in features.items()})["sentence_embedding"]
                          for i in range(0, n, self.rows)])


def _tokenizer_state(tokenizer: Any) -> Any:
    """What decides a fast tokenizer's ids (vocabulary, normaliser, pre-tokeniser, special tokens), without
    the truncation and padding a call sets; a slow tokenizer's vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        return tokenizer.get_vocab()
    state = json.loads(backend.to_str())
    return {k: v for k, v in state.items() if k not in ("truncation", "padding")}


def _column_texts(tokenizer: Any, features: dict) -> list[str]:
    """The texts of one column, decoded from its token ids (FA2-flattened rows split at cu_seq_lens_q)."""
    ids = features["input_ids"]
    if "cu_seq_lens_q" in features:
        flat, bounds = ids[0].tolist(), features["cu_seq_lens_q"].tolist()
        ids = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------

def _check_columns(sizes):
    """Every column holds one row per anchor: document j belongs to anchor j % B."""
    if len(set(sizes)) > 1:
        raise ValueError(f"sentence_features: every column needs one row per anchor; the (anchor, positive[, "
                         f"negative …]) columns have {', '.join(map(str, sizes))} rows")
    if not sizes[0]:
        raise ValueError("sentence_features: empty batch (0 anchors)")


def _relevant(labels: Tensor | None, batch_size: int, n_docs_per_anchor: int) -> Tensor | None:
    """(N,) bool over the concatenated documents: relevant (label > 0) to their anchor; None: the positives."""
    if labels is None:
        return None
    if labels.dim() == 2:
        return labels.T.reshape(-1) > 0
    rest = labels.new_zeros(batch_size * (n_docs_per_anchor - 1), dtype=torch.bool)
    return torch.cat([labels > 0, rest])


class PairRelevanceLoss(PairBCELoss):
    """Sigmoid BCE over every (anchor, document) pair of the batch, on prcl's fused op.

    A prcl.nn.PairBCELoss (its scale/bias parametrisation) whose forward takes the trainer's columns.

    Args:
        model: the SentenceTransformer. Similarity is cosine: embeddings are L2-normalised here.
        scale: logit scale t > 0 (prcl.core.contract.DEFAULT_SCALE, 5, won on the man-pages dev split).
        bias: logit bias b; None means −log(N−1), the prior of one positive among N documents
            (N counts every rank's documents when gathering).
        learnable_scale: make t a parameter, stored as `logit_scale` = log t so it stays positive.
        learnable_bias: make b a parameter `logit_bias`. With bias=None it is an offset on −log(N−1),
            starting at 0, so it keeps its meaning when N changes (a short last batch, more ranks).
            Both parameters are in `loss.parameters()`, which SentenceTransformerTrainer optimises
            with the model; give them their own learning rate with
            `learning_rate_mapping={r"logit_(scale|bias)": 1e-3}` in the training arguments.
        gather_across_devices: score the local anchors against the documents of every rank
            (prcl's process_group path). Needs torch.distributed initialised.
        false_negative_margin: leave out an in-batch negative whose cosine exceeds its anchor's
            positive's + margin, a probable false negative (prcl.fused_pair_bce); None: no mask.
        teacher: a SentenceTransformer (or a path or name to load as one, in float32) that grades every
            pair the data leaves unlabelled (other rows' documents, hard negatives without a label; a label
            the `label` column gives, 0 included, stays): its cosines, calibrated per row against the row's
            positive (prcl.training.teacher), become dense (B, N) labels. It runs frozen, in eval mode,
            under no_grad, on its own device (it is not a submodule of the loss), a column per forward
            (the cached loss: mini_batch_size rows); on the student's token ids when both tokenizers
            are the same (padding side included) and the teacher's max_seq_length is at least the
            student's, else on texts decoded from them (as sentence-transformers' GISTEmbedLoss does).
            Non-finite teacher embeddings stop the step. Not with false_negative_margin or
            gather_across_devices.

    Inputs: (anchor, positive) or (anchor, positive, negative_1, …, negative_k) columns, and an
    optional `label` column in [0, 1]: a float, the graded relevance of the positive, or a list of
    k + 1 floats, one per document column (graded hard negatives: a related passage at 0.5); a
    label < 0 leaves that pair out. Other rows' documents are negatives. A document whose text repeats
    one the anchor lists, or one relevant (label > 0; by default the positive) to a repeated anchor, is
    left out for that anchor rather than counted as a negative (padded token inputs only).
    """

    def __init__(self, model: torch.nn.Module, scale: float = DEFAULT_SCALE, bias: float | None = None,
                 learnable_scale: bool = False, learnable_bias: bool = False, gather_across_devices: bool = False,
                 false_negative_margin: float | None = None, teacher: Any = None) -> None:
        super().__init__(scale, bias, learnable_scale=learnable_scale, learnable_bias=learnable_bias,
                         false_negative_margin=false_negative_margin)
        self.model = model
        self.gather_across_devices = gather_across_devices
        if teacher is not None and (false_negative_margin is not None or gather_across_devices):
            raise ValueError("teacher: grades every pair itself; it does not combine with false_negative_margin "
                             "or gather_across_devices (each rank would need every rank's texts)")
        self.teacher = None if teacher is None else _Teacher(teacher, model, None)

    # -- labels ---------------------------------------------------------------------------------

    def targets(self, sentence_features: list[dict],
                labels: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(labels, label_index) for the batch: the labelled pairs and the excluded ones, or with a
        teacher dense (B, N) labels, the teacher's wherever the data lists no pair."""
        labels, label_index = self._data_targets(sentence_features, labels)
        if self.teacher is None:
            return labels, label_index
        return calibrated_labels(self.teacher.cosines(sentence_features), labels, label_index), None

    def _data_targets(self, sentence_features: list[dict],
                      labels: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        n_columns = len(sentence_features)
        if n_columns < 2:
            raise ValueError(f"sentence_features: expected (anchor, positive[, negative_1, …]) columns, "
                             f"got {n_columns} column(s)")
        if not all(sentence_features):  # what preprocessing makes of an empty list of texts
            raise ValueError("sentence_features: empty batch (a column has no inputs)")
        groups = text_groups(sentence_features)
        if groups is not None:  # every column is a padded (rows, width) batch of token ids
            _check_columns([features["input_ids"].shape[0] for features in sentence_features])
        if labels is not None:
            if (not isinstance(labels, Tensor) or labels.is_complex() or labels.dim() not in (1, 2)
                    or (labels.dim() == 2 and labels.shape[1] != n_columns - 1)):
                raise ValueError(f"labels: expected the float `label` column, one relevance per row or a list of "
                                 f"{n_columns - 1} per row (one per document column), got "
                                 f"{getattr(labels, 'shape', type(labels).__name__)}")
            if groups is not None and labels.device != groups.device:
                raise ValueError(f"labels: on {labels.device} but the batch is on {groups.device}")
            labels = labels.float()
        if groups is None:
            if labels is None or labels.dim() == 1:
                return labels, None
            none = torch.empty(0, dtype=torch.int64, device=labels.device)
            return pair_targets(labels, none, none, labels.shape[0])
        batch_size = groups.shape[0] // n_columns
        if labels is not None and labels.shape[0] != batch_size:
            raise ValueError(f"labels: expected {batch_size} rows, one per anchor, got {tuple(labels.shape)}")
        rows, cols = excluded_pairs(groups[:batch_size], groups[batch_size:], _relevant(labels, batch_size,
                                                                                       n_columns - 1))
        return pair_targets(labels, rows, cols, batch_size)

    # -- the loss -------------------------------------------------------------------------------

    def compute_loss_from_embeddings(self, embeddings: list[Tensor],
                                     targets: tuple[Tensor | None, Tensor | None]) -> Tensor:
        """The loss from the column embeddings [anchor (B, D), positive (B, D), negative_1, …]."""
        _check_columns([e.shape[0] for e in embeddings])
        labels, label_index = targets
        # normalised in float32, handed to the loss in the model's compute dtype (autocast's, else the
        # embeddings'): bf16/fp16 run the 16-bit kernels; a float64 model's go in fp32, prcl's widest
        dtype = compute_dtype(embeddings[0].device, embeddings[0].dtype)
        dtype = dtype if dtype in DTYPES else torch.float32
        q = F.normalize(embeddings[0].float(), dim=-1).to(dtype)
        d = F.normalize(torch.cat(embeddings[1:]).float(), dim=-1).to(dtype)
        if labels is not None and labels.shape[0] != q.shape[0]:
            raise ValueError(f"labels: expected {q.shape[0]} rows, one per anchor, got {tuple(labels.shape)}")
        if not self.gather_across_devices:
            t, b = self.scale_and_bias(d.shape[0])
            return fused_pair_bce(q, d, labels, label_index=label_index, scale=t, bias=b,
                                  false_negative_margin=self.false_negative_margin)
        _require_distributed()
        from prcl.distributed import ddp_loss_scale

        n_docs = d.shape[0]
        if self.learnable_bias and self.fixed_bias is None:
            total = torch.tensor(n_docs, device=d.device)
            dist.all_reduce(total)  # the prior needs the global N, and local batches may differ in size
            n_docs = int(total)
        t, b = self.scale_and_bias(n_docs)
        t, b = (_MeanGradAcrossRanks.apply(x) if isinstance(x, Tensor) and x.requires_grad else x for x in (t, b))
        loss = fused_pair_bce(q, d, labels, label_index=label_index, scale=t, bias=b,
                              process_group=dist.group.WORLD, false_negative_margin=self.false_negative_margin)
        # The ranks' values sum to the loss of the global batch, and DDP averages gradients over
        # ranks: returning world × the local share makes that average the global loss's gradient
        # (and the trainer's logged mean over ranks the global loss).
        return loss * ddp_loss_scale(dist.group.WORLD)

    def forward(self, sentence_features: Iterable[dict], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        targets = self.targets(sentence_features, labels)
        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), targets)

    def get_config_dict(self) -> dict:
        if not self.learnable_bias:
            bias = self.fixed_bias
        elif self.fixed_bias is None:
            bias = f"-log(N-1) + {self.logit_bias.item():.4g}"
        else:
            bias = self.logit_bias.item()
        scale = self.logit_scale.exp().item() if self.learnable_scale else self.fixed_scale
        return {"scale": scale, "bias": bias, "learnable_scale": self.learnable_scale,
                "learnable_bias": self.learnable_bias, "gather_across_devices": self.gather_across_devices,
                "false_negative_margin": self.false_negative_margin,
                "teacher": None if self.teacher is None else self.teacher.model.tokenizer.name_or_path}

    @property
    def citation(self) -> str:
        return SIGLIP_CITATION


class _CachedBatch:
    """What one cached forward hands its loss step: the targets in, the scale/bias gradients out.
    Per call, so a second forward before the first backward cannot mix them up."""

    def __init__(self, targets):
        self.targets = targets
        self.param_grads = []


class CachedPairRelevanceLoss(CachedLossMixin, PairRelevanceLoss):
    """PairRelevanceLoss with GradCache: batches far beyond memory, gradients equal to the plain loss.

    Embeds the batch `mini_batch_size` rows at a time without a graph, computes the loss and its
    gradient w.r.t. every embedding (and scale/bias) once, then re-embeds each mini-batch with a
    graph during backward and pushes the cached gradients through it (sentence-transformers'
    CachedLossMixin). prcl's fused op never materialises B×N, so the loss step is not chunked.
    Arguments as PairRelevanceLoss, plus `mini_batch_size`, `mini_batch_num_tokens` (a token
    budget per mini-batch instead of a row count) and `show_progress_bar`.
    """

    def __init__(self, model: torch.nn.Module, scale: float = DEFAULT_SCALE, bias: float | None = None,
                 learnable_scale: bool = False, learnable_bias: bool = False, gather_across_devices: bool = False,
                 mini_batch_size: int = 32, mini_batch_num_tokens: int | None = None, show_progress_bar: bool = False,
                 false_negative_margin: float | None = None, teacher: Any = None) -> None:
        super().__init__(model, scale=scale, bias=bias, learnable_scale=learnable_scale,
                         learnable_bias=learnable_bias, gather_across_devices=gather_across_devices,
                         false_negative_margin=false_negative_margin, teacher=teacher)
        if has_static_embedding_input(model):
            raise ValueError("model: a StaticEmbedding's inputs cannot be split into mini-batches; "
                             "use PairRelevanceLoss instead")
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size: expected a positive int, got {mini_batch_size!r}")
        if mini_batch_num_tokens is not None and (not isinstance(mini_batch_num_tokens, int)
                                                  or mini_batch_num_tokens < 1):
            raise ValueError(f"mini_batch_num_tokens: expected None or a positive int, got {mini_batch_num_tokens!r}")
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        if self.teacher is not None:
            self.teacher.rows = mini_batch_size
        self.show_progress_bar = show_progress_bar

    def calculate_loss(self, reps: list[list[Tensor]], labels: _CachedBatch | None = None, *,
                       with_backward: bool = False) -> Tensor:
        """The mixin's loss step. `labels` is this call's _CachedBatch (see forward)."""
        batch = labels
        loss = self.compute_loss_from_embeddings([torch.cat(column) for column in reps], batch.targets)
        if not with_backward:
            return loss
        leaves = [mb for column in reps for mb in column]
        params = [p for p in (getattr(self, "logit_scale", None), getattr(self, "logit_bias", None))
                  if p is not None and p.requires_grad]
        # autograd.grad, not backward(): backward would also add the scale/bias gradients to .grad
        # right now, before the trainer's loss scaling and 1/accumulation_steps have been applied.
        grads = torch.autograd.grad(loss, leaves + params)
        for mb, grad in zip(leaves, grads):
            mb.grad = grad  # the mixin caches rep.grad
        batch.param_grads = list(zip(params, grads[len(leaves):]))
        return loss.detach()

    def forward(self, sentence_features: Iterable[dict], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        batch = _CachedBatch(self.targets(sentence_features, labels))
        loss = self.forward_cached(sentence_features, batch)
        # Attach the cached scale/bias gradients with a term that is 0 in value and has gradient g
        # w.r.t. p: they then get multiplied by whatever the outer backward hands down (fp16 loss
        # scale, 1/accumulation_steps), exactly like the mixin's cached embedding gradients.
        for p, g in batch.param_grads:
            pg = (p * g).sum()
            loss = loss + (pg - pg.detach())
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size,
                "mini_batch_num_tokens": self.mini_batch_num_tokens}

    @property
    def citation(self) -> str:
        return SIGLIP_CITATION + GRADCACHE_CITATION
