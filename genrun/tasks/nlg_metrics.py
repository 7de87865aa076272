"""The E2E challenge's five metrics of generated texts, each scored against all of its references.

The challenge's script (tuetschek/e2e-metrics) takes BLEU and NIST from NIST's mteval and
METEOR, ROUGE-L and CIDEr from the MS-COCO caption scripts. Here: BLEU from sacrebleu (its
13a tokenizer is mteval-v13a's), NIST from nltk (a port of mteval's NIST, n = 5, on the same
13a tokens), METEOR 1.5, ROUGE-L and CIDEr from pycocoevalcap (the COCO scripts; METEOR runs
its Java jar, so it needs ``java`` on PATH), on lower-cased 13a tokens as COCO expects.
Scales follow the paper's Table 3: BLEU and ROUGE-L in %, NIST, METEOR and CIDEr as they come.
"""

from __future__ import annotations

import shutil
from functools import lru_cache

from genrun.errors import UserError

METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")


def check_metrics(metrics: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`metrics` as a tuple, or a one-line error naming `task.metrics` and how to fix it."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"task.metrics={list(metrics)} is invalid: choose from {', '.join(METRICS)}")
    if "meteor" in metrics and shutil.which("java") is None:
        rest = [m for m in metrics if m != "meteor"]
        raise UserError(f"task.metrics includes meteor, whose scorer (METEOR 1.5) is a Java program and java is not on "
                     f"PATH: install a Java runtime or drop it: 'task.metrics=[{','.join(rest)}]'")
    return tuple(metrics)


@lru_cache(maxsize=1)
def _meteor():
    """One METEOR scorer per process: it talks to a Java process whose start (~5 s) would
    otherwise come with every evaluation of every split."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


@lru_cache(maxsize=1)
def _tokenizer13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def score(hyps: list[str], refs: list[list[str]], metrics: tuple[str, ...] = METRICS) -> dict[str, float]:
    """The chosen metrics of `hyps[i]` against its references `refs[i]` (one or more each)."""
    if len(hyps) != len(refs) or not hyps or any(not r for r in refs):
        raise ValueError("score() needs one hypothesis and at least one reference per example")
    out: dict[str, float] = {}
    if "bleu" in metrics:
        import sacrebleu

        # sacrebleu takes reference streams: stream k holds every example's k-th reference (None: it has fewer)
        width = max(len(r) for r in refs)
        streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
        out["bleu"] = float(sacrebleu.corpus_bleu(hyps, streams).score)
    if set(metrics) - {"bleu"}:  # NIST and COCO's scorers read 13a tokens
        tokenize = _tokenizer13a()
        hyp_tokens = [tokenize(h.strip()) for h in hyps]
        ref_tokens = [[tokenize(t.strip()) for t in r] for r in refs]
    if "nist" in metrics:
        from nltk.translate.nist_score import corpus_nist

        words = [t.split() for t in hyp_tokens]
        # n-gram orders no hypothesis reaches add nothing (nltk would divide by their count, 0)
        order = min(5, max(len(w) for w in words))
        out["nist"] = float(corpus_nist([[t.split() for t in r] for r in ref_tokens], words, n=order)) if order else 0.0
    coco = [m for m in ("meteor", "rouge_l", "cider") if m in metrics]
    if coco:
        res = {i: [t.lower()] for i, t in enumerate(hyp_tokens)}
        gts = {i: [t.lower() for t in r] for i, r in enumerate(ref_tokens)}
        for name in coco:
            value = float(_coco_scorer(name).compute_score(gts, res)[0])
            out[name] = 100 * value if name == "rouge_l" else value
    return out


def _coco_scorer(name: str):
    if name == "meteor":
        return _meteor()
    if name == "rouge_l":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge()
    from pycocoevalcap.cider.cider import Cider

    return Cider()
