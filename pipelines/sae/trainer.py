"""The SAE trainer of `train-sae` (Gao et al. 2024), over a resumable stream of teacher activations.

The recipe of OpenAI's v5 SAEs: layer-norm input normalisation, the activation of the family that
`sae.architecture` names (TopK by default; `pipelines.sae.families`), decoder rows kept at unit
norm (their gradient's radial part removed before each step), encoder initialised as the decoder's
transpose, pre-bias initialised to the mean of the first buffer, Adam with the learning rate scaled by
1/sqrt(width / 2^14) and gradient clipping at 1. Dead latents (`sae.dead_latents`): the AuxK loss that
reconstructs the residual from the top `aux_k` dead latents (`"auxk"`), or Anthropic's resampling (Bricken
et al. 2023, `"resample"`): at every multiple of the dead window, dead latents restart towards the inputs
the SAE reconstructs worst, with their Adam state reset. Activations come from the teacher (its forward stops
after the hooked block) over the train blocks through a shuffling buffer. Buffer r is a pure function of
(seed, r), so a checkpoint needs only the step, and a resampling event is a pure function of the state and
the step: a resumed run recomputes the buffer and ends with the same weights as an uninterrupted one (on CPU).
Checkpoints are `pipelines.training.state`'s checked step folders; SIGTERM or Ctrl-C finish the step, save
one and return (`Stopped`), as in `pretrain`.

The stage around it (inputs, session, summary) is `pipelines.stages.train_sae`.

Kept whole: the step, the dead-latent remedies and the checkpoint all read and write the same state
(weights, Adam moments, the tokens since each latent fired, the step that fixes the buffer), and the
exact-resume guarantee holds only while they agree on it; `auxk_loss` (`pipelines.sae.auxk`) stands alone.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config.schema import Config
from pipelines.core.failpoints import kill_point
from pipelines.core.files import truncate_jsonl_after
from pipelines.core.layout import TRAINED_SAE
from pipelines.core.session import Stopped
from pipelines.data.token_store import TokenStore
from pipelines.errors import StageError
from pipelines.sae.auxk import auxk_loss

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
# The single file an older cocomix kept its resume state in; it is not read (`restore`).
LEGACY_CHECKPOINT = "checkpoint.pt"
SAE_STATE_FORMAT = "cocomix-sae-state/1"
KEEP_CHECKPOINTS = 2  # the newest, and one to fall back on if it is damaged
# Inputs scored to choose the restart directions: the first rows of the (already shuffled) current buffer.
RESAMPLE_POOL_TOKENS = 65_536


class SaeTrainer:
    """Gao et al.'s SAE training loop over a deterministic, resumable stream of teacher activations."""

    def __init__(self, cfg: Config, teacher, token_store: TokenStore, stage_dir: Path, device, on_eval=None):
        import torch

        from pipelines.sae.families import sae_class
        from pipelines.training.state import Checkpoints

        self.cfg, self.s = cfg, cfg.sae
        self.teacher, self.token_store, self.dir, self.device = teacher, token_store, stage_dir, device
        self.block_size = token_store.block_size
        self.blocks_per_buffer = max(1, self.s.buffer_tokens // self.block_size)
        self.steps_per_buffer = self.blocks_per_buffer * self.block_size // self.s.batch_tokens
        self.total_steps = -(-self.s.train_tokens // self.s.batch_tokens)  # at least train_tokens
        self.aux_k = self.s.aux_k or max(1, teacher.d_model // 2)
        self.lr = self.s.lr or 2e-4 / math.sqrt(self.s.latents / 2**14)
        torch.manual_seed(cfg.run.seed)
        family = sae_class(self.s.architecture)
        self.sae = family.for_training(teacher.d_model, self.s.latents, self.s.k).to(device)
        with torch.no_grad():
            self.sae.W_dec.normal_()
            self.sae.W_dec.div_(self.sae.W_dec.norm(dim=-1, keepdim=True))
            self.sae.W_enc.copy_(self.sae.W_dec.t())
        fused = torch.device(device).type == "cuda" or None  # the fast kernel on CUDA; foreach on the CPU
        params = self.sae.parameters()
        self.optimizer = torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), eps=6.25e-10, fused=fused)
        self.tokens_since_fired = torch.zeros(self.s.latents, dtype=torch.long, device=device)
        self.window_steps = -(-self.s.dead_after_tokens // self.s.batch_tokens)
        self.resampled = 0  # latents restarted so far
        self.step = 0
        self.checkpoints = Checkpoints(stage_dir, KEEP_CHECKPOINTS)
        self._buffer: tuple[int, Any] | None = None
        self._epoch_order: tuple[int, Any] = (-1, None)
        self.on_eval = on_eval or (
            lambda **progress: None
        )  # e.g. the manifest's progress for `cocomix status`

    # -- data --

    def _block_order(self, position: int) -> int:
        """Train block index at `position` of the endless stream: one seeded permutation per epoch."""
        n = self.token_store.split("train").shape[0]
        epoch, offset = divmod(position, n)
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, np.random.default_rng([self.cfg.run.seed, epoch]).permutation(n))
        return int(self._epoch_order[1][offset])

    def _buffer_activations(self, index: int):
        """Buffer `index`: normalised activations of its blocks, shuffled by a generator seeded by index."""
        import torch

        if self._buffer is not None and self._buffer[0] == index:
            return self._buffer[1]
        positions = range(index * self.blocks_per_buffer, (index + 1) * self.blocks_per_buffer)
        rows = [self._block_order(p) for p in positions]
        blocks = self.token_store.split("train")
        acts = []
        batch_blocks = max(1, 8192 // self.block_size)
        for start in range(0, len(rows), batch_blocks):
            ids = torch.from_numpy(
                np.stack([blocks[r] for r in rows[start : start + batch_blocks]]).astype(np.int64)
            )
            acts.append(self.teacher.hidden_states(ids.to(self.device)).float().flatten(0, 1))
        acts = self.sae.prepare_input(torch.cat(acts))[0]
        generator = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + index)
        acts = acts[torch.randperm(len(acts), generator=generator).to(acts.device)]
        self._buffer = (index, acts)
        return acts

    def _batch(self, step: int):
        index, within = divmod(step, self.steps_per_buffer)
        acts = self._buffer_activations(index)
        return acts[within * self.s.batch_tokens : (within + 1) * self.s.batch_tokens]

    # -- steps --

    def restore(self, resume: bool) -> None:
        import torch

        legacy = self.dir / LEGACY_CHECKPOINT
        if resume and legacy.exists():
            raise StageError(
                f"{legacy} is the resume state of an older cocomix, which this one does not read. Run "
                "`cocomix train-sae --force` to train the SAE from the start."
            )
        if resume and self.checkpoints.latest() is not None:
            checkpoint, sae_state, state = self.checkpoints.load_newest_intact()
            self.sae.load_state_dict(sae_state)
            self.optimizer.load_state_dict(state["optimizer"])
            self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
            self.resampled = int(state["resampled"])
            self.step = checkpoint.step
            truncate_jsonl_after(self.dir / METRICS, self.step)
            log.info("resuming train-sae at step %d of %d", self.step, self.total_steps)
            return
        (self.dir / METRICS).unlink(missing_ok=True)
        with torch.no_grad():  # Gao et al.: the pre-bias starts at the data's centre
            self.sae.b_dec.copy_(self._batch(0).mean(0))
        self._log({"step": 0, "loss": None, "aux_loss": None, **self.evaluate(), "tokens_per_s": None})

    def train(self, show_progress: bool) -> Stopped | None:
        """Train to the end; returns None when done, or where a signal stopped it early."""
        import torch
        from tqdm.auto import tqdm

        from pipelines.training.speed import SpeedMeter
        from pipelines.training.stop_signals import StopSignals

        eval_every = max(1, self.s.eval_every_tokens // self.s.batch_tokens)
        checkpoint_every = max(1, self.s.checkpoint_every_tokens // self.s.batch_tokens)
        bar = tqdm(
            total=self.total_steps * self.s.batch_tokens,
            initial=self.step * self.s.batch_tokens,
            unit="tok",
            unit_scale=True,
            desc="train-sae",
            disable=not show_progress,
            dynamic_ncols=True,
        )
        speed = SpeedMeter(self.s.batch_tokens, torch.device(self.device), warmup_windows=0)  # no compiling
        with bar, StopSignals("train-sae") as signals:  # the bar closes before an error's line is printed
            while self.step < self.total_steps:
                losses = self._advance()
                speed.step()
                bar.update(self.s.batch_tokens)
                if self.step % eval_every == 0 or self.step == self.total_steps:
                    # Reading the losses back waits for the window's steps: its tokens/s is taken then.
                    row = {
                        "step": self.step,
                        **{name: round(value.item(), 6) for name, value in losses.items()},
                    }
                    tokens_per_s, _ = speed.window()
                    with speed.paused():
                        self._log({**row, **self.evaluate(), "tokens_per_s": round(tokens_per_s, 1)})
                stop = signals.requested is not None and self.step < self.total_steps
                if stop or self.step % checkpoint_every == 0 and self.step < self.total_steps:
                    with speed.paused():
                        self._save_checkpoint()
                if stop:
                    path = str(self.checkpoints.latest().path)
                    return Stopped(stopped_by=signals.requested, stopped_at_step=self.step, checkpoint=path)
        return None

    def _advance(self) -> dict:
        """One step of the loop: resample dead latents where due, train on the step's batch, count it."""
        if self._resample_due() and self.resample_dead_latents():
            kill_point("train-sae resampled")  # before any checkpoint holds the restarted latents
        losses = self._train_step(self._batch(self.step))
        self.step += 1
        if self.step == self.total_steps:  # the last buffer's batches, already in memory
            first = (self.step - 1) // self.steps_per_buffer * self.steps_per_buffer
            self.sae.end_training(self._batch(step) for step in range(first, self.step))
        return losses

    def _encode_decode(self, x, dense_pre_grad: bool = False):
        """(pre-activations, kept ids, their values, reconstruction) of normalised inputs `x`, as the
        family trains (`SparseAutoencoder.train_encode`)."""
        code = self.sae.train_encode(x, dense_pre_grad)
        return code.pre, code.ids, code.values, code.recon

    def _train_step(self, x) -> dict:
        """One optimizer step; its losses as device tensors, read back only when they are logged."""
        import torch

        sae = self.sae
        auxk = self.s.dead_latents == "auxk" and self.s.aux_coef > 0
        code = self.sae.train_encode(x, dense_pre_grad=auxk)
        pre, ids, values, recon = code.pre, code.ids, code.values, code.recon
        variance = (x - x.mean(0)).pow(2).sum(-1).mean()
        residual = x - recon
        mse = residual.pow(2).sum(-1).mean() / variance
        loss, aux = mse, torch.zeros((), device=x.device)
        # No latent can be dead before `dead_after_tokens` were trained, which the host knows: AuxK is skipped
        # there with no read-back. After, `auxk_loss` is 0 on the device while none is dead.
        if auxk and self.step * self.s.batch_tokens >= self.s.dead_after_tokens:
            aux = auxk_loss(pre, residual.detach(), self.dead_latents(), self.aux_k, sae.W_dec)
            loss = loss + self.s.aux_coef * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # Unit-norm decoder rows: drop the gradient's radial part, step, then renormalise.
            grad = sae.W_dec.grad
            grad -= (grad * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            self.optimizer.step()
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
            sae.observe_training_batch(code)
            hits = (values > 0).flatten().long()  # scattered: a boolean index would make the host wait
            fired = torch.zeros_like(self.tokens_since_fired).scatter_add_(0, ids.flatten(), hits)
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired.masked_fill_(fired > 0, 0)
        return {"loss": mse.detach(), "aux_loss": aux.detach()}

    def dead_latents(self):
        """(latents,) bool: silent for at least `sae.dead_after_tokens` training tokens."""
        return self.tokens_since_fired >= self.s.dead_after_tokens

    def _resample_due(self) -> bool:
        """At every multiple of the dead window, except where fewer than one window of training is left
        (a latent restarted then could not show that it lives before the run ends)."""
        return (
            self.s.dead_latents == "resample"
            and self.step > 0
            and self.step % self.window_steps == 0
            and self.step + self.window_steps <= self.total_steps
        )

    def resample_dead_latents(self) -> int:
        """Restart every dead latent on an input drawn with probability proportional to its squared
        reconstruction error, as Bricken et al. (2023) do: decoder row = the input's unit direction from
        b_dec, encoder bias 0, Adam moments 0. The encoder column is that direction too, scaled, unlike
        theirs (0.2 x the live columns' mean norm, made for ReLU SAEs), so that the latent's pre-activation
        on its input equals the mean of that input's k largest: under TopK a latent fires only among the k
        largest, and it must fire to learn. Returns how many latents restarted."""
        import torch
        import torch.nn.functional as F

        sae = self.sae
        dead = self.dead_latents()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        pool = self._buffer_activations(self.step // self.steps_per_buffer)[:RESAMPLE_POOL_TOKENS]
        with torch.no_grad():
            errors = torch.cat(
                [(x - self._encode_decode(x)[3]).pow(2).sum(-1) for x in pool.split(self.s.batch_tokens)]
            )
            generator = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + 7_919 * self.step)
            weights = errors.double().cpu().clamp_min(1e-30)  # a perfect reconstruction: draw uniformly
            rows = torch.multinomial(weights, n_dead, replacement=n_dead > len(pool), generator=generator).to(
                pool.device
            )
            sources = pool[rows]
            # Each source's k largest activations: the kept ones where the family keeps k per token (as
            # computed in training, so that TopK restarts are those of earlier versions bit for bit).
            kept = self._encode_decode(sources)[2] if sae.k_per_token is not None else None
            top_k = kept if kept is not None else sae.pre_activation(sources).topk(self.s.k).values.relu()
            top_k_mean = top_k.mean(-1, keepdim=True)
            offsets = sources - sae.b_dec
            sae.W_dec[dead] = F.normalize(offsets, dim=-1)
            # pre-activation on the source = offsets . column = top_k_mean (b_enc is 0)
            squared_norms = offsets.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
            sae.W_enc[:, dead] = (offsets * (top_k_mean / squared_norms)).t()
            sae.b_enc[dead] = 0.0
            for param, index in ((sae.W_dec, dead), (sae.W_enc, (slice(None), dead)), (sae.b_enc, dead)):
                state = self.optimizer.state.get(param, {})
                for moment in ("exp_avg", "exp_avg_sq"):
                    if moment in state:
                        state[moment][index] = 0.0
            self.tokens_since_fired[dead] = 0
        self.resampled += n_dead
        log.info("train-sae step %d: resampled %d dead latents", self.step, n_dead)
        return n_dead

    # -- evaluation --

    def evaluate(self) -> dict[str, float]:
        """FVU and L0 on held-out activations, dead fraction, teacher loss with the SAE spliced in."""
        import torch

        val = self.token_store.split("val")
        blocks = max(1, min(val.shape[0], self.s.eval_tokens // self.block_size))
        ids = torch.from_numpy(val[:blocks].astype(np.int64)).to(self.device)
        with torch.no_grad():
            hidden = self.teacher.hidden_states(ids).float()
            flat = hidden.flatten(0, 1)
            recon = self.sae(flat)
            fvu = (flat - recon).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum()
            l0 = (self.sae.encode(flat) > 0).sum(-1).float().mean()
            clean = self.teacher.next_token_loss(ids)
            spliced = self.teacher.next_token_loss(ids, replace=lambda h: self.sae(h.float()))
            zero = self.teacher.next_token_loss(ids, replace=torch.zeros_like)
        dead = self.dead_latents().float().mean()
        return {
            "fvu": round(fvu.item(), 6),
            "l0": round(l0.item(), 3),
            "dead_fraction": round(dead.item(), 6),
            "resampled": self.resampled,
            "loss_clean": round(clean, 6),
            "loss_spliced": round(spliced, 6),
            "loss_zero_ablation": round(zero, 6),
            "loss_increase": round(spliced - clean, 6),
        }

    # -- files --

    def _log(self, row: dict[str, Any]) -> None:
        with open(self.dir / METRICS, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.on_eval(
            step=row["step"], steps=self.total_steps, fvu=row["fvu"], dead_fraction=row["dead_fraction"]
        )
        log.info(
            "train-sae step %d: fvu %.4f, dead %.3f, loss +%.4f",
            row["step"],
            row["fvu"],
            row["dead_fraction"],
            row["loss_increase"],
        )

    def _save_checkpoint(self) -> None:
        config = {"architecture": self.sae.architecture, "d_in": self.sae.d_in, "d_sae": self.sae.d_sae}
        state = {
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired,
            "resampled": self.resampled,
            "step": self.step,
        }
        self.checkpoints.save(self.step, self.sae.state_dict(), config, state, model_format=SAE_STATE_FORMAT)
        if self.resampled:
            kill_point("train-sae checkpoint after resampling")

    def finish(self) -> dict[str, Any]:
        from pipelines.sae.formats import save_saelens
        from pipelines.training.speed import steady_speed

        rows = [json.loads(line) for line in (self.dir / METRICS).read_text().splitlines()]
        final = rows[-1]
        save_saelens(
            self.sae,
            self.dir / TRAINED_SAE,
            {
                "model_name": self.teacher.spec,
                "hook_name": f"layer{self.teacher.layer}.{self.teacher.hook}",
                "hook_layer": self.teacher.layer,
                "trained_tokens": self.step * self.s.batch_tokens,
                # Not the throughput: the folder's hash enters every downstream fingerprint, which must
                # not change with the wall time of a rerun that trained the same weights.
                "metrics": {k: v for k, v in final.items() if k not in ("step", "tokens_per_s")},
            },
        )
        shutil.rmtree(self.checkpoints.dir, ignore_errors=True)
        return {
            "sae": str(self.dir / TRAINED_SAE),
            "steps": self.step,
            "tokens": self.step * self.s.batch_tokens,
            "architecture": self.s.architecture,
            "latents": self.s.latents,
            "k": self.s.k,
            "lr": self.lr,
            **{k: v for k, v in final.items() if k not in ("step", "loss", "aux_loss", "tokens_per_s")},
            "tokens_per_s": steady_speed(rows),  # the median window's
        }
