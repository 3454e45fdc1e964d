"""Source -> target models from ``zenlm finetune seq2seq``, ready to use:

    s2s = zenlm.seq2seq.load(RUN_DIR)         # zenlm.load(RUN_DIR) does the same for encoder-decoder runs
    s2s.generate("long article ...", num_beams=4)                 # -> "headline"
    s2s.generate(["text 1", "text 2"], num_beams=1)               # -> ["...", "..."]   (greedy)

Works for both designs the recipe trains: an encoder-decoder reads the source and writes the target; a
decoder-only model continues ``source <|bos|>`` until its end token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from zenlm.beam import BeamConfig, beam_search_encdec, beam_search_gpt
from zenlm.errors import CheckpointError, ConfigError
from zenlm.models.registry import get_architecture
from zenlm.rundir import LoadedRun, load_run
from zenlm.tokenizer import Tokenizer


class Seq2SeqLM:
    """A trained source -> target model with its tokenizer and the settings it was trained with."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, settings: dict[str, Any],
                 run_dir: Path | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.run_dir = run_dir
        self.arch = settings.get("arch", "encdec")
        # an encoder-decoder reads the source on its own; a decoder-only model continues "source <sep>"
        self.reads_source = get_architecture(self.arch).can("seq2seq")

    @property
    def config(self) -> Any:
        return self.model.config

    def _source_ids(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("every source must be a non-empty string.")
        s = self.settings
        ids = self.tokenizer.encode(text)[: int(s["max_source_tokens"])]
        return ids + [int(s["eos_id"] if self.reads_source else s["sep_id"])]

    def generate(self, sources: str | Sequence[str], *, num_beams: int = 4, max_new_tokens: int | None = None,
                 length_penalty: float = 1.0, early_stopping: bool = False, no_repeat_ngram_size: int = 0,
                 use_cache: bool = True, batch_size: int = 16) -> str | list[str]:
        """Target text for each source (a str for a str). ``num_beams=1`` is greedy decoding; see
        :class:`zenlm.beam.BeamConfig` for the other settings. max_new_tokens defaults to the longest target
        the model was trained with (plus its end token)."""
        single = isinstance(sources, str)
        texts = [sources] if single else list(sources)
        if not texts:
            raise ConfigError("no sources given.")
        s = self.settings
        cfg = BeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens or int(s["max_target_tokens"]) + 1,
                         length_penalty=length_penalty, early_stopping=early_stopping,
                         no_repeat_ngram_size=no_repeat_ngram_size)
        ids = [self._source_ids(t) for t in texts]
        eos = int(s["eos_id"])
        if self.reads_source:
            hyps = beam_search_encdec(self.model, ids, cfg, start_id=int(s["bos_id"]), eos_id=eos,
                                      pad_id=int(s["pad_id"]), use_cache=use_cache, batch_size=batch_size)
        else:
            hyps = beam_search_gpt(self.model, ids, cfg, eos_id=eos, use_cache=use_cache, batch_size=batch_size)
        outs = [self.tokenizer.decode(h[0].tokens, skip_special=True).strip() for h in hyps]
        return outs[0] if single else outs

    def stream(self, prompt: str, *, max_new_tokens: int | None = None, num_beams: int = 4,
               **ignored: Any) -> Iterator[str]:
        """The target for ``prompt`` as one piece (so ``zenlm generate`` works on seq2seq runs too).

        Beam search has to finish before the best output is known, so nothing is streamed early; the sampling
        settings of :class:`zenlm.generate.GenerationConfig` (temperature, top_k, ...) are not used."""
        yield str(self.generate(prompt, num_beams=num_beams, max_new_tokens=max_new_tokens or None))

    @classmethod
    def from_run(cls, run: LoadedRun) -> Seq2SeqLM:
        """The Seq2SeqLM of a loaded run; ConfigError when it was not trained on source/target pairs."""
        settings = run.saved.get("seq2seq")
        if settings is None:
            raise ConfigError(f"{run.run_dir} was not trained on source/target pairs (config.yaml has no seq2seq "
                              "section); train one with `zenlm finetune seq2seq`.")
        _check_settings(settings, run.run_dir / "config.yaml", run.tokenizer.vocab_size)
        return cls(run.model, run.tokenizer, settings, run.run_dir)


def _check_settings(settings: dict[str, Any], path: Path, vocab_size: int) -> None:
    """The ``seq2seq`` section of a run's config.yaml: the lengths and token ids decoding reads must be whole
    numbers (ids inside the vocabulary); CheckpointError naming the file and the field otherwise."""
    for key in ("max_source_tokens", "max_target_tokens", "bos_id", "eos_id", "pad_id", "sep_id"):
        value = settings.get(key)
        if value is None and key in ("bos_id", "pad_id", "sep_id"):
            continue  # what the design does not use may be missing
        limit = vocab_size if key.endswith("_id") else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (limit and value >= limit):
            what = f"a token id below {limit}" if limit else "a whole number >= 0"
            raise CheckpointError(f"{path}: seq2seq.{key} must be {what}, got {value!r}; the file is damaged "
                                  "or was edited by hand.")


def load(run_dir: str | Path, *, device: str = "auto", dtype: str = "fp32") -> Seq2SeqLM:
    """Load a run directory written by ``zenlm finetune seq2seq`` as a :class:`Seq2SeqLM` (an encoder-decoder,
    or a decoder-only model trained on pairs); ``zenlm.load`` gives the same for such a run."""
    return Seq2SeqLM.from_run(load_run(run_dir, device=device, dtype=dtype))


def evaluate_generation(lm: Seq2SeqLM, pairs: Sequence[Any], *, metrics: Sequence[str] = ("bleu", "chrf", "rouge"),
                        lang: str = "auto", n_examples: int = 5, progress: Any = None,
                        **generate_kwargs: Any) -> dict[str, Any]:
    """Generate a target for every pair's source and score it against the pair's target.

    Returns a JSON-ready report: ``metrics`` (see :func:`zenlm.evaluate.generation_metrics`), ``n``,
    ``seconds``, the generation settings, the language and the first ``n_examples`` examples.
    """
    import time

    from zenlm.evaluate import detect_lang, generation_metrics
    from zenlm.progress import report

    if not pairs:
        raise ConfigError("no pairs to evaluate.")
    sources, references = [p.source for p in pairs], [p.target for p in pairs]
    lang = detect_lang(references) if lang == "auto" else lang
    batch = int(generate_kwargs.pop("batch_size", 16))
    t0 = time.perf_counter()
    predictions: list[str] = []
    for s in range(0, len(sources), batch):
        out = lm.generate(sources[s : s + batch], batch_size=batch, **generate_kwargs)
        predictions.extend(out)
        report(progress, "evaluate", done=len(predictions), total=len(sources), unit="ex")
    seconds = time.perf_counter() - t0
    scores = generation_metrics(predictions, references, lang=lang, metrics=metrics)  # type: ignore[arg-type]
    return {
        "run": str(lm.run_dir) if lm.run_dir else None,
        "arch": lm.arch,
        "n": len(pairs),
        "lang": lang,
        "metrics": scores,
        "seconds": round(seconds, 2),
        "generation": {k: v for k, v in generate_kwargs.items()},
        "examples": [{"source": src[:300], "reference": ref, "prediction": pred}
                     for src, ref, pred in list(zip(sources, references, predictions, strict=True))[:n_examples]],
        "predictions": predictions,
    }
__all__ = ["Seq2SeqLM", "load", "evaluate_generation"]
