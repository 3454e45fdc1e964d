"""A trained sentence VAE as ``zenlm.load`` returns it: sentences in, codes out, and codes back to sentences.

    vae = zenlm.load("runs/vae")                       # a run made by `zenlm vae train`
    vae.sample(5, seed=0)                              # z ~ N(0, I) -> decoder -> 5 new sentences
    vae.reconstruct(["i will not hurt him ."])         # z = mu(x), the posterior mean -> greedy decoding
    vae.interpolate("come hither , sir .", "i have done my duty .", steps=5)   # z on the line mu(a) .. mu(b)
    vae.encode(["..."])                                # the posterior means, [N, z_dim]

Decoding runs the model's own decoder step (:meth:`zenlm.models.vae.TextVAE.step`) from the state z gives it, one
token per row per step, and picks tokens through :class:`zenlm.sampling.Sampler` (temperature 0 = greedy; row i of
a call draws from seed + i). Text is normalised as the training sentences were (English lowercased, words and
punctuation split by spaces).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zenlm.data.classify import pad_batch
from zenlm.data.sentences import Lang, normalise_sentence
from zenlm.errors import DataError
from zenlm.models.vae import TextVAE
from zenlm.rundir import LoadedRun
from zenlm.sampling import Sampler, SamplingConfig
from zenlm.tokenizer import Tokenizer


class SentenceVAE:
    """A sentence VAE with its tokenizer (see the module docstring)."""

    def __init__(self, model: TextVAE, tokenizer: Tokenizer, run_dir: Path | None = None,
                 lang: Lang = "en") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.lang = lang

    @classmethod
    def from_run(cls, run: LoadedRun) -> SentenceVAE:
        return cls(run.model, run.tokenizer, run.run_dir, (run.saved.get("vae") or {}).get("lang", "en"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    @torch.inference_mode()
    def encode(self, texts: str | Sequence[str]) -> Tensor:
        """The posterior means mu(x) of ``texts`` (normalised first): [N, z_dim] float32."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise DataError("give at least one sentence to encode.")
        limit = self.model.config.max_len - 1
        seqs = [ids[:limit] or [self.tokenizer.unk_id] for ids in
                self.tokenizer.encode_batch([normalise_sentence(t, self.lang) for t in texts])]
        ids_BT, mask_BT = pad_batch(seqs, self.tokenizer.pad_id or 0)
        mu_BZ, _ = self.model.encode(ids_BT.to(self.device), mask_BT.sum(1).to(self.device))
        return mu_BZ.float().cpu()

    @torch.inference_mode()
    def decode(self, z_NZ: Tensor, *, temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
               max_len: int | None = None) -> list[str]:
        """Sentences for the codes z_NZ [N, z_dim]: decoded from <bos> until <eos> or ``max_len`` tokens (default:
        the longest training sentence), tokens picked by temperature / top-k sampling (0: greedy)."""
        tok, model = self.tokenizer, self.model
        N = z_NZ.shape[0]
        cfg = SamplingConfig(temperature=temperature, top_k=top_k, seed=seed)
        samplers = [Sampler(cfg, model.config.vocab_size, device=self.device, seed_offset=i) for i in range(N)]
        state = model.initial_state(z_NZ.to(self.device, torch.float32))
        tokens_B = torch.full((N,), tok.bos_id, dtype=torch.long, device=self.device)
        out: list[list[int]] = [[] for _ in range(N)]
        done = [False] * N
        for _ in range(max_len or model.config.max_len):
            logits_BV, state = model.step(tokens_B, state)
            picked = [samplers[i].choose(logits_BV[i]).token for i in range(N)]
            for i, t in enumerate(picked):
                if not done[i]:
                    done[i] = t == tok.eos_id
                    if not done[i]:
                        out[i].append(t)
            if all(done):
                break
            tokens_B = torch.tensor(picked, device=self.device)
        return [tok.decode(ids, skip_special=True).strip() for ids in out]

    def sample(self, n: int = 1, *, temperature: float = 1.0, top_k: int | None = None,
               seed: int | None = None) -> list[str]:
        """``n`` new sentences: codes drawn from the prior N(0, I) (seeded by ``seed``), then decoded."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        z_NZ = torch.randn((n, self.z_dim), generator=generator)
        return self.decode(z_NZ, temperature=temperature, top_k=top_k, seed=seed)

    def reconstruct(self, texts: str | Sequence[str], *, temperature: float = 0.0,
                    seed: int | None = None) -> list[str]:
        """Each sentence encoded to its posterior mean and decoded again (greedily by default)."""
        return self.decode(self.encode(texts), temperature=temperature, seed=seed)

    def interpolate(self, a: str, b: str, *, steps: int = 5, temperature: float = 0.0,
                    seed: int | None = None) -> list[str]:
        """Sentences along the straight line from mu(a) to mu(b): ``steps`` points, both ends included."""
        if steps < 2:
            raise DataError(f"steps must be >= 2 (the two ends), got {steps}.")
        mu_2Z = self.encode([a, b])
        w_N1 = torch.linspace(0.0, 1.0, steps)[:, None]
        return self.decode((1 - w_N1) * mu_2Z[0] + w_N1 * mu_2Z[1], temperature=temperature, seed=seed)


def from_run(run: LoadedRun) -> Any:
    """What ``zenlm.load`` returns for a sentence-VAE run (the registry's ``api`` for arch "vae")."""
    return SentenceVAE.from_run(run)


__all__ = ["SentenceVAE", "from_run"]
