"""The diagnosis-text task (the paper's T3): an LSTM caption decoder over the shared features.

A caption is encoded as ``SOS w1 .. wn EOS PAD ..`` in a row of ``max_length + 2`` ids. The
decoder predicts the ``L = max_length + 1`` positions after SOS (``w1 .. wn EOS``), so logits
are ``(B, L, V)`` and position ``t`` is predicted from the tokens ``0 .. t`` of a prefix.

Distillation needs teacher and student to read the same prefix (DESIGN.md, "Known traps"):
on a row with a reference caption both read the reference; on any other row the teachers'
ensemble decodes greedily, and the student is teacher-forced on those tokens
(:meth:`CaptionTask.guide_from_soft`). Positions after the first EOS are masked out of
every loss and never scored by BLEU.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillkit import DistillkitError, MetricAccumulator, Params, Task, kl_rows, tempered_probs
from eye_fundus.bleu import EOS_TOKEN, PAD_TOKEN, SOS_TOKEN, UNK_TOKEN, corpus_bleu, sentence_bleu_average, strip_special

Tensor = torch.Tensor
log = logging.getLogger(__name__)

PAD, SOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = (PAD_TOKEN, SOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
#: what an out-of-vocabulary *reference* word becomes for BLEU: it counts towards the
#: reference length but no hypothesis can match it (a decoded <unk> is not that word)
REFERENCE_UNK = "<unk:reference>"


class CaptionParams(Params):
    kind: str = "caption"
    #: dataset label field (defaults to the task name)
    field: str | None = None
    #: lambda_t, the task's weight in the loss
    weight: float = Field(1.0, ge=0)
    #: keep the N most frequent training words (the paper: 193); the rest become <unk>
    vocab_size: int = Field(193, ge=1)
    #: words seen fewer times than this in training become <unk>
    min_count: int = Field(1, ge=1)
    #: diagnoses (whole captions, after tokenisation) seen fewer times than this in training are
    #: dropped from the task's target in every split (the row keeps its other tasks); the paper: 10
    min_caption_count: int = Field(1, ge=1)
    #: per caption, ``sum`` or ``mean`` the cross-entropy (and the KL) over its generated words and
    #: EOS; the batch is then averaged. The paper sums (section 3.1); ``mean`` keeps short and long
    #: captions on one scale and is the default of existing configs
    reduction: Literal["sum", "mean"] = "mean"
    #: words per caption; longer captions are truncated (the paper: 14)
    max_length: int = Field(14, ge=1)
    embedding_dim: int = Field(256, ge=1, description="size of the word embeddings (the paper: 256)")
    hidden_dim: int = Field(512, ge=1, description="LSTM hidden size (the paper: 512)")
    #: probability of reading the reference token (not the model's own) at each training step
    teacher_forcing: float = Field(0.5, ge=0, le=1)
    decode: Literal["greedy", "beam"] = Field("greedy",
                                              description="inference decoding: greedy (the paper) or beam search")
    beam_size: int = Field(3, ge=1, description="beams of beam decoding")
    #: the primary metric: corpus BLEU-4, or the mean of smoothed sentence BLEU-4 (the paper's)
    bleu: Literal["corpus", "sentence_average"] = "corpus"


_WORD = re.compile(r"[0-9a-z]+(?:['-][0-9a-z]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case words: runs of letters and digits, keeping a hyphen or apostrophe inside a
    word ("non-proliferative", "o'brien"); every other character (punctuation, whitespace)
    separates words, so "cataract," and "cataract" are the same word."""
    return _WORD.findall(text.lower())


class CaptionDecoder(nn.Module):
    """Image features -> dense layer -> the initial ``(h, c)`` of a one-layer LSTM over word
    embeddings -> a linear layer to vocabulary logits."""

    def __init__(self, in_features: int, vocab_size: int, embedding_dim: int, hidden_dim: int):
        super().__init__()
        self.init_state = nn.Linear(in_features, 2 * hidden_dim)
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, batch_first=True)
        self.output = nn.Linear(hidden_dim, vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.output.out_features

    def initial_state(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(h0, c0)``, each ``(1, B, hidden)``, projected from the image features."""
        h, c = self.init_state(features).chunk(2, dim=-1)
        # tanh puts h0 in the range an LSTM's hidden state lives in (h = o * tanh(c)).
        return torch.tanh(h).unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()

    def forward(self, features: Tensor, inputs: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, T, V)`` for input tokens ``(B, T)``: one LSTM call."""
        out, _ = self.lstm(self.embedding(inputs), self.initial_state(features))
        return self.output(out)

    def step(self, inputs: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One decoding step: logits ``(B, V)`` for input tokens ``(B,)`` and the next state."""
        out, state = self.lstm(self.embedding(inputs).unsqueeze(1), state)
        return self.output(out.squeeze(1)), state


class CaptionTask(Task):
    """Diagnosis text generation over a vocabulary learned from the training captions."""

    Params = CaptionParams
    primary_metric = "bleu"

    def __init__(self, name: str, params: CaptionParams):
        super().__init__(name, params)
        #: id -> token, the four specials first
        self.vocabulary: list[str] = []
        self._index: dict[str, int] = {}
        #: the captions kept by ``min_caption_count`` (None: all of them)
        self._kept: set[str] | None = None
        #: the most frequent training caption (tokens): the baseline ``bleu_constant`` scores
        self.most_frequent: list[str] | None = None

    # labels -------------------------------------------------------------------------------
    def fit(self, labels: Sequence[str | None]) -> None:
        self._kept = None
        if self.params.min_caption_count > 1:
            captions = Counter(" ".join(tokenize(text)) for text in labels if text is not None)
            self._kept = {c for c, n in captions.items() if n >= self.params.min_caption_count and c}
            labels = [t if t is not None and " ".join(tokenize(t)) in self._kept else None for t in labels]
        captions = Counter(" ".join(words) for text in labels if text is not None
                           for words in [tokenize(text)[: self.params.max_length]] if words)
        # ties alphabetical, so the baseline never depends on row order
        self.most_frequent = min(captions, key=lambda c: (-captions[c], c)).split() if captions else None
        counts = Counter(w for text in labels if text is not None for w in tokenize(text))
        # Most frequent first, ties alphabetical, so the vocabulary never depends on row order.
        ranked = sorted((w for w, n in counts.items() if n >= self.params.min_count and w not in SPECIALS),
                        key=lambda w: (-counts[w], w))
        self._set_vocabulary(list(SPECIALS) + ranked[: self.params.vocab_size])

    def _set_vocabulary(self, vocabulary: list[str]) -> None:
        self.vocabulary = vocabulary
        self._index = {w: i for i, w in enumerate(vocabulary)}

    def _require_fit(self) -> None:
        if not self.vocabulary:
            raise RuntimeError(f"task '{self.name}' must be fitted (or its state loaded) first")

    @property
    def num_words(self) -> int:
        """Vocabulary words, without the four special tokens."""
        return max(len(self.vocabulary) - len(SPECIALS), 0)

    @property
    def steps(self) -> int:
        """L: the positions a caption row predicts (``max_length`` words and EOS)."""
        return self.params.max_length + 1

    def encode(self, labels: Sequence[str | None], where: str = "") -> dict[str, Tensor]:
        """``tokens`` ``(N, max_length + 2)`` and ``present`` ``(N,)``. Unknown words become
        <unk>; a missing or blank caption gives ``present=False`` and a row of PAD."""
        self._require_fit()
        tokens = torch.full((len(labels), self.params.max_length + 2), PAD, dtype=torch.long)
        present = torch.zeros(len(labels), dtype=torch.bool)
        truncated = 0
        for i, text in enumerate(labels):
            words = tokenize(text) if text is not None else []
            if self._kept is not None and " ".join(words) not in self._kept:
                continue  # a rare diagnosis (min_caption_count): no target for this task
            if len(words) > self.params.max_length:
                truncated += 1
                words = words[: self.params.max_length]
            if not words:  # an empty diagnosis teaches nothing but "stop at once"
                continue
            ids = [SOS, *(self._index.get(w, UNK) for w in words), EOS]
            tokens[i, : len(ids)] = torch.tensor(ids)
            present[i] = True
        if truncated:
            log.warning("%s%d of %d captions of task '%s' %s longer than %d words (max_length) and %s truncated.",
                        f"{where}: " if where else "", truncated, len(labels), self.name,
                        "is" if truncated == 1 else "are", self.params.max_length, "was" if truncated == 1 else "were")
        return {"tokens": tokens, "present": present}

    def decode_text(self, tokens: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Token rows -> strings; stops at the first EOS and drops SOS and PAD."""
        rows = tokens.tolist() if isinstance(tokens, Tensor) else tokens
        return [" ".join(self.vocabulary[i] for i in strip_special(row, eos=EOS, skip=(PAD, SOS))) for row in rows]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"vocabulary": list(self.vocabulary)}
        if self._kept is not None:
            state["kept_captions"] = sorted(self._kept)
        if self.most_frequent is not None:
            state["most_frequent_caption"] = " ".join(self.most_frequent)
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        vocabulary = list(state.get("vocabulary", []))
        if tuple(vocabulary[: len(SPECIALS)]) != SPECIALS:
            raise DistillkitError(f"the saved state of caption task '{self.name}' has no valid vocabulary "
                                  f"(it must start with {', '.join(SPECIALS)}).")
        self._set_vocabulary(vocabulary)
        kept = state.get("kept_captions")
        self._kept = set(kept) if kept is not None else None
        frequent = state.get("most_frequent_caption")  # absent from older checkpoints: no baseline
        self.most_frequent = frequent.split() if frequent else None

    # model --------------------------------------------------------------------------------
    def build_head(self, in_features: int) -> nn.Module:
        self._require_fit()
        p = self.params
        return CaptionDecoder(in_features, len(self.vocabulary), p.embedding_dim, p.hidden_dim)

    def forward(self, head: nn.Module, features: Tensor, guide: Mapping[str, Tensor] | None = None,
                train: bool = False) -> Tensor:
        """Logits ``(B, L, V)`` for the positions after SOS, conditioned on ``guide["tokens"]``.

        Scheduled sampling (``train=True``, ``teacher_forcing < 1``) applies to reference
        captions only, i.e. a target (it carries ``"present"``). A teacher's prefix (from
        :meth:`guide_from_soft`) is always teacher-forced: the teacher's distributions were
        computed on exactly that prefix, and the KL compares them position by position.
        Without a guide the decoder reads its own greedy output.
        """
        if guide is None:
            with torch.no_grad():
                prefix, _ = self._greedy([head], [features], [1.0])
            return head(features, prefix[:, : self.steps])
        tokens = guide["tokens"][:, : self.steps]
        if train and self.params.teacher_forcing < 1.0 and "present" in guide:
            return self._scheduled_sampling(head, features, tokens)
        return head(features, tokens)  # the common case: one batched LSTM call

    def _scheduled_sampling(self, head: CaptionDecoder, features: Tensor, tokens: Tensor) -> Tensor:
        # One coin per row and step (Bengio et al. 2015): True reads the reference token,
        # False the model's own argmax from the previous step. SOS is always read.
        read_reference = torch.rand(tokens.shape, device=tokens.device) < self.params.teacher_forcing
        state = head.initial_state(features)
        inputs = tokens[:, 0]
        steps = []
        for t in range(tokens.shape[1]):
            logits, state = head.step(inputs, state)
            steps.append(logits)
            if t + 1 < tokens.shape[1]:
                own = logits.detach().argmax(-1)
                inputs = torch.where(read_reference[:, t + 1], tokens[:, t + 1], own)
        return torch.stack(steps, dim=1)

    def predict(self, head: nn.Module, features: Tensor) -> dict[str, Tensor]:
        """``tokens`` ``(B, max_length + 2)``: SOS, the decoded words, EOS, then PAD."""
        with torch.no_grad():
            if self.params.decode == "beam":
                tokens = self._beam_search(head, features, self.params.beam_size)
            else:
                tokens, _ = self._greedy([head], [features], [1.0])
        return {"tokens": tokens}

    # decoding -----------------------------------------------------------------------------
    def _unusable(self, device: torch.device) -> Tensor:
        """Tokens a decoder never emits: PAD (only ever written after EOS) and SOS."""
        banned = torch.zeros(len(self.vocabulary), dtype=torch.bool, device=device)
        banned[[PAD, SOS]] = True
        return banned

    def _greedy(self, heads: Sequence[CaptionDecoder], features: Sequence[Tensor], weights: Sequence[float],
                tau: float | None = None, reference: Tensor | None = None,
                forced: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Greedy decoding by a weighted ensemble, step by step.

        At each step every head reads the same token; the next token is the argmax of the
        weighted mean of the heads' softmax at temperature 1. Rows where ``forced`` is True
        read ``reference`` instead. After EOS a row reads and writes PAD. Returns the tokens
        ``(B, L + 1)`` and, when ``tau`` is given, the weighted mean of the heads' tempered
        distributions at every step ``(B, L, V)``.
        """
        first = features[0]
        batch, device = first.shape[0], first.device
        banned = self._unusable(device)
        tokens = torch.full((batch, self.steps + 1), PAD, dtype=torch.long, device=device)
        tokens[:, 0] = SOS
        states = [head.initial_state(f) for head, f in zip(heads, features)]
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        pad = torch.full_like(finished, PAD, dtype=torch.long)
        step_probs: list[Tensor] = []
        inputs = tokens[:, 0]
        for t in range(self.steps):
            vote, mixed = None, None
            for k, (head, w) in enumerate(zip(heads, weights)):
                logits, states[k] = head.step(inputs, states[k])
                p = F.softmax(logits.float(), dim=-1) * w
                vote = p if vote is None else vote + p
                if tau is not None:
                    q = tempered_probs(logits, tau) * w
                    mixed = q if mixed is None else mixed + q
            if mixed is not None:
                step_probs.append(mixed)
            chosen = vote.masked_fill(banned, -1.0).argmax(-1)
            chosen = torch.where(finished, pad, chosen)
            finished = finished | (chosen == EOS)
            if forced is not None:
                chosen = torch.where(forced, reference[:, t + 1], chosen)
            tokens[:, t + 1] = chosen
            inputs = chosen
        return tokens, (torch.stack(step_probs, dim=1) if tau is not None else None)

    def _beam_search(self, head: CaptionDecoder, features: Tensor, beam: int) -> Tensor:
        """Beam search on the sum of log-probabilities (no length normalisation), batched
        over rows and beams. A beam that wrote EOS is finished: it can only continue with PAD
        at no cost, so its score is frozen while it competes with the open beams. With
        ``beam=1`` this is exactly greedy decoding."""
        batch, device = features.shape[0], features.device
        steps, vocab = self.steps, len(self.vocabulary)
        banned = self._unusable(device)
        after_eos = torch.full((vocab,), float("-inf"), device=device)
        after_eos[PAD] = 0.0
        h, c = head.initial_state(features)
        h, c = h.repeat_interleave(beam, dim=1), c.repeat_interleave(beam, dim=1)
        # Only beam 0 is alive at the start, so the first step yields `beam` distinct words.
        scores = torch.full((batch, beam), float("-inf"), device=device)
        scores[:, 0] = 0.0
        words = torch.full((batch, beam, steps), PAD, dtype=torch.long, device=device)
        finished = torch.zeros(batch, beam, dtype=torch.bool, device=device)
        base = torch.arange(batch, device=device)[:, None] * beam
        inputs = torch.full((batch * beam,), SOS, dtype=torch.long, device=device)
        for t in range(steps):
            logits, (h, c) = head.step(inputs, (h, c))
            logp = F.log_softmax(logits.float(), dim=-1).masked_fill(banned, float("-inf")).view(batch, beam, vocab)
            logp = torch.where(finished[..., None], after_eos, logp)
            scores, flat = (scores[..., None] + logp).view(batch, beam * vocab).topk(beam, dim=-1)
            parent, token = flat // vocab, flat % vocab
            words = words.gather(1, parent[..., None].expand(batch, beam, steps))
            words[:, :, t] = token
            finished = finished.gather(1, parent) | (token == EOS)
            rows = (base + parent).view(-1)
            h, c = h[:, rows], c[:, rows]
            inputs = token.view(-1)
        best = words[:, 0]  # topk keeps beams sorted by score
        return torch.cat([torch.full((batch, 1), SOS, dtype=torch.long, device=device), best], dim=1)

    @staticmethod
    def _through_first_eos(tokens: Tensor) -> Tensor:
        """``(B, L)`` mask of the positions after SOS up to and including the first EOS."""
        eos = (tokens[:, 1:] == EOS).long()
        return (eos.cumsum(1) - eos) == 0

    # losses -------------------------------------------------------------------------------
    def hard_loss(self, logits: Tensor, target: Mapping[str, Tensor]) -> Tensor:
        """Cross-entropy over each caption's words and its EOS, summed or averaged per caption
        (``reduction``); 0 for rows without one."""
        gold = target["tokens"][:, 1 : self.steps + 1]
        valid = gold != PAD
        ce = F.cross_entropy(logits.float().flatten(0, 1), gold.flatten(), ignore_index=PAD,
                             reduction="none").view_as(gold)
        per_row = (ce * valid).sum(1)
        if self.params.reduction == "mean":
            per_row = per_row / valid.sum(1).clamp_min(1)
        return torch.where(target["present"], per_row, torch.zeros_like(per_row))

    def soft_loss(self, logits: Tensor, soft: Mapping[str, Tensor], tau: float) -> Tensor:
        """Sum or mean (``reduction``) over the valid positions (``soft["mask"]``) of the per-token
        tempered KL."""
        mask = soft["mask"]
        kl = kl_rows(logits, soft["probs"], tau)  # (B, L)
        # where, not a product: whatever a cache stored at padded positions cannot leak in.
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        if self.params.reduction == "sum":
            return kl.sum(1)
        return kl.sum(1) / mask.sum(1).clamp_min(1)

    def soft_target(self, heads: Sequence[nn.Module], features: Sequence[Tensor], weights: Sequence[float],
                    target: Mapping[str, Tensor] | None, tau: float) -> dict[str, Tensor]:
        """The teachers' weighted tempered distributions on one shared prefix per row.

        Rows with a reference caption are teacher-forced on it; the others (no target, or
        no caption in it) read the ensemble's greedy decode. Returns ``tokens`` (the prefix,
        ``(B, max_length + 2)``), ``probs`` ``(B, L, V)`` and ``mask`` ``(B, L)``.
        """
        self._require_fit()
        for head in heads:
            if head.vocab_size != len(self.vocabulary):
                raise DistillkitError(
                    f"a teacher's caption decoder for task '{self.name}' has {head.vocab_size} output words, "
                    f"the task's vocabulary {len(self.vocabulary)}: teachers must share the student's vocabulary "
                    "(the same training split).")
        # Reading the mask once per batch (a host sync) buys the batched path: one LSTM call
        # per teacher instead of L steps, for the usual all-captioned labeled batch.
        if target is not None and bool(target["present"].all()):
            tokens = target["tokens"]
            probs = None
            for head, feats, w in zip(heads, features, weights):
                p = tempered_probs(head(feats, tokens[:, : self.steps]), tau) * w
                probs = p if probs is None else probs + p
        else:
            forced = target["present"] if target is not None else None
            reference = target["tokens"] if target is not None else None
            tokens, probs = self._greedy(heads, features, weights, tau=tau, reference=reference, forced=forced)
        return {"tokens": tokens, "probs": probs, "mask": self._through_first_eos(tokens)}

    def guide_from_soft(self, soft: Mapping[str, Tensor], target: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
        """The student reads the teachers' prefix (the reference where there was one)."""
        return {"tokens": soft["tokens"]}

    # evaluation ---------------------------------------------------------------------------
    def metrics(self) -> MetricAccumulator:
        self._require_fit()
        constant = None
        if self.most_frequent is not None:  # as the model would write it: unknown words become <unk>
            constant = [w if w in self._index else UNK_TOKEN for w in self.most_frequent]
        return CaptionMetrics(self.vocabulary, self.params.bleu, constant)

    def headline_metrics(self) -> list[tuple[str, str]]:
        # BLEU beside always writing the most frequent training caption: a text head that has
        # learned nothing but that caption shows at a glance.
        return [(self.primary_metric, self.primary_metric), ("bleu_constant", "most frequent")]

    def describe(self) -> str:
        return f"diagnosis text of '{self.field}', vocabulary {self.num_words}, up to {self.params.max_length} words"


class CaptionMetrics(MetricAccumulator):
    """Corpus BLEU-4 and mean sentence BLEU-4 of decoded captions over a whole split, and
    ``bleu_constant``: the primary BLEU of writing the most frequent training caption for
    every row (the baseline a text head must beat).

    References are the encoded captions (truncated to ``max_length`` words, as the paper
    does); an out-of-vocabulary reference word can never be matched.
    """

    def __init__(self, vocabulary: Sequence[str], primary: str = "corpus", constant: Sequence[str] | None = None):
        self.vocabulary = list(vocabulary)
        self.primary = primary
        #: the most frequent training caption: ``bleu_constant`` scores writing it for every row
        self.constant = None if constant is None else list(constant)
        # Kept as tensors until compute(): no host sync per batch.
        self._batches: list[tuple[Tensor, Tensor, Tensor]] = []

    def update(self, prediction: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
        self._batches.append((prediction["tokens"].detach(), target["tokens"].detach(), target["present"].detach()))

    def _words(self, ids: Sequence[int], unk: str) -> list[str]:
        return [unk if i == UNK else self.vocabulary[i] for i in strip_special(ids, eos=EOS, skip=(PAD, SOS))]

    def compute(self) -> dict[str, Any]:
        hypotheses: list[list[str]] = []
        references: list[list[str]] = []
        for hyp, ref, present in self._batches:
            for h, r, p in zip(hyp.cpu().tolist(), ref.cpu().tolist(), present.cpu().tolist()):
                if p:
                    hypotheses.append(self._words(h, UNK_TOKEN))
                    references.append(self._words(r, REFERENCE_UNK))
        corpus = corpus_bleu(references, hypotheses)
        sentence = sentence_bleu_average(references, hypotheses)
        out = {"bleu": corpus if self.primary == "corpus" else sentence,
               "bleu_corpus": corpus, "bleu_sentence_avg": sentence, "n": len(hypotheses)}
        if self.constant is not None:
            always = [list(self.constant)] * len(references)
            out["bleu_constant"] = (corpus_bleu(references, always) if self.primary == "corpus"
                                    else sentence_bleu_average(references, always))
        return out
